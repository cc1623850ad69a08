"""`streamlens prune` as one pipeline of named steps: choose -> compare -> export -> prove.

Each step is one call and one field of `PruneRun`, so a later step (evaluating the pruned model
against the full one, healing it) is one more call between `prove` and the return, and one more
field. `run` never writes anything but the export folder (atomically); the command writes the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from streamlens import ablation as A
from streamlens.ablation.spec import Progress
from streamlens.data import TokenBatch, check_disjoint
from streamlens.model import Model
from streamlens.model.export import ExportRefused
from streamlens.prune.choose import check_k, choose
from streamlens.prune.compare import compare, comparison_specs, verdicts
from streamlens.prune.prove import export, prove
from streamlens.results import command_line
from streamlens.results.layers import Verdict
from streamlens.results.prune import KINDS, STRATEGIES, ExportCheck, PruneChoice, StrategyComparison

Stage = Callable[[str, int], None]  # (what starts, how many evaluations it runs)


@dataclass(frozen=True)
class PruneConfig:
    """What `run` does.

    Attributes:
        k: blocks to remove (None: the budget decides, or L // 8 without one).
        budget: nats of choice-data loss increase the greedy removal may spend (exported: the most
            greedy blocks within it); replaces k.
        strategy: whose removal is exported (`results.prune.STRATEGIES`; attention / mlp cannot be).
        k_max: strategies are compared on held-out text for k = 1 .. k_max (default: k).
        export_dir: the folder for the pruned HF model (None: no export, no proof).
        gguf: also write a float32 GGUF file into the export folder.
        proof_windows: held-out windows the export's logits are compared on.
    """

    k: int | None = None
    budget: float | None = None
    strategy: str = "greedy"
    k_max: int | None = None
    export_dir: str | None = None
    gguf: bool = False
    proof_windows: int = 4
    options: A.EvalOptions = field(default_factory=A.EvalOptions)

    def check(self, n_layers: int) -> "PruneConfig":
        """Raise ValueError / ExportRefused naming the bad setting (before any model work)."""
        if self.strategy not in KINDS:
            raise ValueError(f"unknown strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if self.export_dir is not None and KINDS[self.strategy] != "block":
            raise ExportRefused(f"strategy {self.strategy!r} removes {KINDS[self.strategy]} sublayers, which no HF "
                                f"config of the families streamlens checks can express (a block without its "
                                f"{KINDS[self.strategy]}): it is measured only; pass --no-export")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget {self.budget} nats must be at least 0")
        if self.budget is not None and self.strategy != "greedy":
            raise ValueError(f"--budget chooses with measured greedy removal, not {self.strategy!r}")
        for name in ("k", "k_max"):
            value = getattr(self, name)
            if value is not None:
                check_k(value, n_layers)
        if self.proof_windows < 1:
            raise ValueError(f"proof windows {self.proof_windows} must be at least 1")
        return self

    def ks(self, n_layers: int) -> tuple[int | None, int]:
        """(k to export or None when the budget decides, k_max to choose and compare up to)."""
        if self.budget is not None:
            return None, self.k_max or max(1, n_layers // 2)
        k = self.k or max(1, n_layers // 8)
        return k, max(k, self.k_max or k)


@dataclass(frozen=True)
class PruneRun:
    """Everything one `streamlens prune` run measured (each step's result) and its timings (seconds)."""

    choice: PruneChoice
    comparison: StrategyComparison
    verdicts: tuple[Verdict, ...]
    strategy: str
    k: int
    removed: tuple[int, ...]
    export: ExportCheck | None
    seconds: dict[str, float]


def run(model: Model, choice_batch: TokenBatch, eval_batch: TokenBatch, config: PruneConfig, *,
        stage: Stage | None = None, progress: Progress | None = None, command: str | None = None) -> PruneRun:
    """Choose on `choice_batch`, compare on `eval_batch` (disjoint windows), export and prove.

    Steps: 1 choose (every strategy, k = 1 .. k_max); 2 compare on held-out text; 3 export the
    chosen strategy's removal for k; 4 prove the export (`prove.prove`) on the first
    `proof_windows` held-out windows.
    """
    config.check(model.n_layers)
    check_disjoint(choice_batch, eval_batch)
    command = command or command_line()
    k, k_max = config.ks(model.n_layers)
    n = model.n_layers
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if stage:
        stage("choose (greedy on the choice data)", sum(n - step for step in range(k_max)))
    choice = choose(model, choice_batch, k_max, config.options, budget=config.budget, progress=progress,
                      command=command)
    seconds["choose"] = time.perf_counter() - started
    if k is None:
        k = choice.k_budget or 0
        if k == 0:
            raise ValueError(f"no block fits the budget of {config.budget} nats: removing the cheapest block costs "
                             f"{float(choice.greedy_damage[0]):.3f} nats on the choice data")
    if stage:
        stage("compare (held-out text)", len(comparison_specs(choice)[0]))
    started = time.perf_counter()
    comparison = compare(model, eval_batch, choice, config.options, progress=progress, command=command)
    seconds["compare"] = time.perf_counter() - started
    removed = choice.removed(config.strategy, k)
    check = None
    if config.export_dir is not None:
        if stage:
            stage("export and prove", 1)
        started = time.perf_counter()
        folder = export(model, removed, config.export_dir, gguf=config.gguf, command=command)
        seconds["export"] = time.perf_counter() - started
        started = time.perf_counter()
        check = prove(model, folder, removed, eval_batch.tokens[: config.proof_windows], eval_batch.description,
                        command)
        seconds["prove"] = time.perf_counter() - started
    # (issue 20 parts 5-6 go here: evaluate the exported model against the full one, heal it)
    return PruneRun(choice, comparison, verdicts(comparison, k), config.strategy, k, removed, check, seconds)
