"""`streamlens prune` as one pipeline of named steps: choose -> compare -> export -> prove -> evaluate -> heal.

Each step is one call and one field of `PruneRun`. `run` never writes anything but the export folder
and the healed model's folder (each atomically); the command writes the rest. The exported folder
is loaded back (what a user would load) to be evaluated against the full model and to be healed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from streamlens import ablation as A
from streamlens.ablation.spec import Progress
from streamlens.data import TokenBatch, check_disjoint
from streamlens.model import Model, load_model
from streamlens.model.export import ExportRefused, check_export_folder
from streamlens.model.train import TrainSettings
from streamlens.prune.choose import check_k, choose
from streamlens.prune.compare import compare, comparison_specs, verdicts
from streamlens.prune.evaluate import EvaluateSettings
from streamlens.prune.evaluate import compare as evaluate_pruned
from streamlens.prune.heal import heal
from streamlens.prune.prove import export, prove
from streamlens.results import command_line
from streamlens.results.layers import Verdict
from streamlens.results.prune import KINDS, STRATEGIES, ExportCheck, PruneChoice, StrategyComparison
from streamlens.results.pruned import HealResult, PrunedComparison

Stage = Callable[[str, int], None]  # (what starts, how many evaluations it runs)
T = TypeVar("T")


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
        evaluate: how the exported model is judged against the full one (None: not judged).
        heal: how the exported model is healed (None or 0 steps: not healed); needs training windows.
        heal_dir: the healed model's folder (default: the export folder's name + "-healed").
    """

    k: int | None = None
    budget: float | None = None
    strategy: str = "greedy"
    k_max: int | None = None
    export_dir: str | None = None
    gguf: bool = False
    proof_windows: int = 4
    options: A.EvalOptions = field(default_factory=A.EvalOptions)
    evaluate: EvaluateSettings | None = None
    heal: TrainSettings | None = None
    heal_dir: str | None = None

    @property
    def heals(self) -> bool:
        return self.heal is not None and self.heal.steps > 0

    @property
    def healed_folder(self) -> str | None:
        """Where the healed model goes (None: no healing)."""
        if not self.heals or self.export_dir is None:
            return None
        return self.heal_dir or str(self.export_dir).rstrip("/") + "-healed"

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
        if self.heals and self.export_dir is None:
            raise ValueError("healing trains the exported model: give an export folder (drop --no-export)")
        if self.healed_folder is not None:
            check_export_folder(self.healed_folder)
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
    evaluation: PrunedComparison | None = None
    heal: HealResult | None = None


def run(model: Model, choice_batch: TokenBatch, eval_batch: TokenBatch, config: PruneConfig, *,
        heal_tokens: torch.Tensor | None = None, heal_data: str = "", stage: Stage | None = None,
        progress: Progress | None = None, command: str | None = None) -> PruneRun:
    """Choose on `choice_batch`, compare on `eval_batch` (disjoint windows), export, prove, evaluate, heal.

    Steps: 1 choose (every strategy, k = 1 .. k_max); 2 compare on held-out text; 3 export the
    chosen strategy's removal for k; 4 prove the export (`prove.prove`) on the first
    `proof_windows` held-out windows; 5 evaluate the exported folder, loaded back, against the full
    model on `eval_batch` (`config.evaluate`); 6 heal it on `heal_tokens` [n, pos] (windows disjoint
    from `eval_batch`'s), save, prove and judge the healed model before/after (`config.heal`).
    """
    config.check(model.n_layers)
    check_disjoint(choice_batch, eval_batch)
    if config.heals and heal_tokens is None:
        raise ValueError("healing needs training windows (heal_tokens), disjoint from the evaluation windows")
    command = command or command_line()
    seconds: dict[str, float] = {}
    choice, k = timed(seconds, "choose", lambda: choose_step(model, choice_batch, config, stage, progress, command))
    if stage:
        stage("compare (held-out text)", len(comparison_specs(choice)[0]))
    comparison = timed(seconds, "compare", lambda: compare(model, eval_batch, choice, config.options,
                                                           progress=progress, command=command))
    removed = choice.removed(config.strategy, k)
    check = evaluation = healed = None
    if config.export_dir is not None:
        if stage:
            stage("export, prove" + (", evaluate" if config.evaluate else "") + (", heal" if config.heals else ""), 1)
        run_id = uuid.uuid4().hex
        with removed_on_failure(config.export_dir, run_id):  # an interrupted or failed run leaves no model of its own
            folder = timed(seconds, "export", lambda: export(model, removed, config.export_dir, gguf=config.gguf,
                                                             command=command, run_id=run_id))
            check = timed(seconds, "prove", lambda: prove(model, folder, removed,
                                                          eval_batch.tokens[: config.proof_windows],
                                                          eval_batch.description, command))
            evaluation, healed = judge_and_heal(model, folder, eval_batch, config, heal_tokens, heal_data, seconds,
                                                command, run_id)
    return PruneRun(choice, comparison, verdicts(comparison, k), config.strategy, k, removed, check, seconds,
                    evaluation, healed)


@contextlib.contextmanager
def removed_on_failure(folder: str | Path, run_id: str) -> Iterator[None]:
    """Delete `folder` when the body fails or is interrupted, if it holds this run's model (its
    streamlens-export.json carries `run_id`): a folder another run wrote is never touched."""
    try:
        yield
    except BaseException:
        if written_by(folder) == run_id:
            remove_folders(folder)
        raise


def written_by(folder: str | Path) -> str | None:
    """The run id in a model folder's streamlens-export.json (None: none, or no readable file)."""
    try:
        return json.loads((Path(folder) / "streamlens-export.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def remove_folders(*folders: str | Path | None) -> None:
    """Delete the model folders a run wrote (never called on a folder it did not create)."""
    for folder in folders:
        if folder is not None and Path(folder).is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def timed(seconds: dict[str, float], name: str, step: Callable[[], T]) -> T:
    """Run one step and record its wall seconds under `name`."""
    started = time.perf_counter()
    result = step()
    seconds[name] = time.perf_counter() - started
    return result


def choose_step(model: Model, batch: TokenBatch, config: PruneConfig, stage: Stage | None,
                progress: Progress | None, command: str) -> tuple[PruneChoice, int]:
    """Step 1: every strategy's choice up to k_max, and the k to export (the budget's, when one is given)."""
    k, k_max = config.ks(model.n_layers)
    if stage:
        stage("choose (greedy on the choice data)", A.cumulative_evaluations(model.n_layers, "greedy", k_max))
    choice = choose(model, batch, k_max, config.options, budget=config.budget, progress=progress, command=command)
    if k is None:
        k = choice.k_budget or 0
        if k == 0:
            raise ValueError(f"no block fits the budget of {config.budget} nats: removing the cheapest block costs "
                             f"{float(choice.greedy_damage[0]):.3f} nats on the choice data")
    return choice, k


def judge_and_heal(model: Model, folder: Path, eval_batch: TokenBatch, config: PruneConfig,
                   heal_tokens: torch.Tensor | None, heal_data: str, seconds: dict[str, float],
                   command: str, run_id: str) -> tuple[PrunedComparison | None, HealResult | None]:
    """Steps 5-6 on the exported folder loaded back: the full-vs-pruned evaluation, then healing."""
    if config.evaluate is None and not config.heals:
        return None, None
    pruned = load_model(str(folder), dtype=model.info.dtype, device=model.info.device)
    evaluation = None
    if config.evaluate is not None:
        settings = config.evaluate
        evaluation = timed(seconds, "evaluate", lambda: evaluate_pruned(model, pruned, eval_batch, settings,
                                                                        folders=(None, folder), command=command))
    healed = None
    if config.heals:
        assert config.heal is not None and heal_tokens is not None and config.healed_folder is not None
        train, target = config.heal, config.healed_folder
        with removed_on_failure(target, run_id):
            _, healed = timed(seconds, "heal", lambda: heal(
                pruned, heal_tokens, eval_batch, target, train, teacher=model, train_data=heal_data,
                n_boot=config.options.n_boot, seed=config.options.seed, command=command,
                proof_tokens=eval_batch.tokens[: config.proof_windows], run_id=run_id, gguf=config.gguf))
    return evaluation, healed
