"""The option groups the commands share, declared once (after tuned-lens's `scripts/ingredients.py`).

A group is a frozen dataclass (what a command receives) plus its typer options (what the user types):

- `ModelOptions`  `--model --dtype --device --threads --verify`: `.load()` sets the threads and loads;
- `DataOptions`   `--data --window [--max-windows]`: the text or prompt source, checked before any load;
- `PromptOptions` `--prompt --target`: the one prompt a command explains;
- `OutputOptions` `--out`: checked (creating nothing) before any work; `.write()` writes one set.

A command names the groups it takes in `@uses(...)` and declares a parameter of the group's type under
the same name; `uses` replaces that parameter by the group's options (in its place, so `--help` lists
them together), validates them and hands the command the built object. Groups are built per command
(`model_group(dtypes=...)`, `data_group(default=...)`) where a default or a valid range differs. Only
typer is imported here: `streamlens --help` must not load torch.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import typer

from streamlens.cli.common import MODEL_HELP, check_out, default_threads, fail

DTYPES = ("float32", "float64", "bfloat16")
EXACT_DTYPES = ("float32", "float64")  # bfloat16's 8-bit mantissa cannot keep an exact sum
DEVICE_HELP = "cpu, cuda, cuda:1, mps."
VERIFY_HELP = "Re-hash every file of the cached model conversion (default: only files whose size or mtime changed)."


def max_threads() -> int:
    """The most `--threads` accepted: 4 per CPU (more only slows torch down; 100000 crashed it)."""
    return 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class Group:
    """One option group: `options` (parameter suffix -> (type, typer option)) and `build`, which turns the
    parsed values (same keys) into the group's object, failing with one line on a bad value."""

    options: dict[str, tuple[Any, Any]]
    build: Callable[..., Any]


def uses(**groups: Group) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command its option groups: the parameter `name: SomeOptions` becomes the group's options.

    The wrapped command's signature (what typer reads) has `name_suffix` parameters in place of `name`;
    the wrapper builds each group from them, in the order given, before the command runs.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature, hints = inspect.signature(command), get_type_hints(command)
        missing = set(groups) - set(signature.parameters)
        if missing:
            raise TypeError(f"{command.__name__} takes no parameter for the groups {sorted(missing)}")
        parameters = []  # typer passes every value by name: all keyword-only, in the order --help shows
        for parameter in signature.parameters.values():
            if parameter.name not in groups:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                                    annotation=hints.get(parameter.name, parameter.annotation)))
                continue
            for suffix, (kind, option) in groups[parameter.name].options.items():
                parameters.append(inspect.Parameter(f"{parameter.name}_{suffix}", inspect.Parameter.KEYWORD_ONLY,
                                                    default=option, annotation=kind))

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            built = {}
            for key, group in groups.items():
                built[key] = group.build(**{suffix: values.pop(f"{key}_{suffix}") for suffix in group.options})
            return command(**values, **built)

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelOptions:
    """`--model` (one, or several where a command overlays models), `--dtype`, `--device`, `--threads`, `--verify`.

    `names` is empty for the default model (SmolLM2); `threads` None: the cores idle now.
    """

    names: tuple[str, ...]
    dtype: str
    device: str
    threads: int | None
    verify: bool

    @property
    def name(self) -> str | None:
        """The one model of a single-model command (None: the default)."""
        return self.names[0] if self.names else None

    def check_paths(self) -> None:
        """Fail on a --model written as a path that does not exist, before any model loads (a command that
        loads several checks them all first; a hub name is left to the load)."""
        for name in self.names:
            _check_model_path(name)

    def set_threads(self) -> int:
        """Give torch `--threads` (default: the cores idle now); returns the number used."""
        import torch

        chosen = self.threads or default_threads()
        torch.set_num_threads(chosen)
        return chosen

    def load(self, name: str | None = None, *, device: str | None = None, strict: bool = True):
        """Load `name` (default: this group's one model) with the group's dtype, device and verify."""
        from streamlens.model import load_model

        return load_model(name if name is not None else self.name, dtype=self.dtype, device=device or self.device,
                          verify=self.verify, strict=strict)


def model_group(*, dtypes: tuple[str, ...] = DTYPES, many: bool = False, why: str = "") -> Group:
    """The model options; `dtypes` this command offers (`why` says why others are not), `many`: --model repeats."""
    offered = ", ".join(dtypes[:-1]) + f" or {dtypes[-1]}" if len(dtypes) > 1 else dtypes[0]

    def build(name: Any, dtype: str, device: str, threads: int | None, verify: bool) -> ModelOptions:
        if dtype not in DTYPES:
            fail(f"unknown dtype {dtype!r}: --dtype takes {offered}")
        if dtype not in dtypes:
            fail(f"--dtype {dtype} is not offered here: choose {offered}" + (f" ({why})" if why else ""))
        if threads is not None and not 1 <= threads <= max_threads():
            fail(f"--threads {threads} must be at least 1 and at most {max_threads()} (4 per CPU of this machine's "
                 f"{os.cpu_count() or 1}); leave it out for the idle cores")
        names = tuple(name or ()) if many else (() if name is None else (name,))
        return ModelOptions(names, dtype, device, threads, verify)

    return Group({
        "name": (list[str] if many else str, typer.Option(None, "--model", help=MODEL_HELP + (
            " Repeat to overlay several models." if many else ""))),
        "dtype": (str, typer.Option("float32", "--dtype", help=offered + (f" ({why})." if why else "."))),
        "device": (str, typer.Option("cpu", "--device", help=DEVICE_HELP)),
        "threads": (int, typer.Option(None, "--threads", help="torch CPU threads (default: the cores idle right now, "
                                      "at least 1; at most 4 per CPU).")),
        "verify": (bool, typer.Option(False, "--verify", help=VERIFY_HELP)),
    }, build)


def _check_model_path(name: str) -> None:
    """A --model that is written as a path must exist: fail before any model loads (a hub name is left to the load)."""
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.suffix == ".gguf" or name.count("/") > 1
    if looks_like_path and not path.exists():
        fail(f"--model {name} does not exist: give 'smollm2', a .gguf file, an HF folder or a name in the local HF "
             f"cache")


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataOptions:
    """`--data` (None: the built-in texts), `--window` and `--max-windows` (None where not given or not offered)."""

    source: str | None
    window: int | None
    max_windows: int | None

    @property
    def prompts(self) -> bool:
        """Whether the source is a prompt/target set (scored at each prompt's last position)."""
        from streamlens.data import is_prompt_source

        return is_prompt_source(self.source)


TEXTS_HELP = ("builtin (default: prose and code in data/), stdlib (the Python standard library's own source), a .txt file, "
              "a .jsonl file ({\"text\"} lines), a folder of text files, or a literal text")
PROMPTS_HELP = "prompts (built-in prompt/target set), a .jsonl file of {\"prompt\", \"target\"} lines"


@dataclass(frozen=True)
class Count:
    """A whole-number option of the data group: its default (None: chosen by the command), its least value,
    why that least (said when refused) and its help."""

    default: int | None
    least: int
    why: str = ""
    help: str = ""


def data_group(*, command: str, default: str | None = None, prompts: bool = False, window: Count | None = None,
               max_windows: Count | None = None, note: str = "") -> Group:
    """The data options of `command`: `--data` (text sources, and prompt sets where `prompts`), `--window`
    and `--max-windows` where given (their default and least value). The source is read once here, so a bad
    one fails before any model loads."""

    def build(source: str | None, window: int | None = None, max_windows: int | None = None) -> DataOptions:
        from streamlens import data as D

        for option, value, count in (("--window", window, window_count), ("--max-windows", max_windows, max_count)):
            if count is not None and value is not None and value < count.least:
                fail(f"{option} {value} must be at least {count.least}" + (f" ({count.why})" if count.why else ""))
        if not prompts and D.is_prompt_source(source):
            fail(f"--data {source!r} is a prompt set: {command} runs on texts ({TEXTS_HELP})")
        try:
            D.check_source(source)
        except (ValueError, OSError) as error:
            fail(str(error))
        return DataOptions(source, window, max_windows)

    window_count, max_count = window, max_windows
    kinds = f"{PROMPTS_HELP}, {TEXTS_HELP}" if prompts else TEXTS_HELP
    options: dict[str, tuple[Any, Any]] = {"source": (str, typer.Option(default, "--data", help=f"{kinds}." + (
        f" {note}" if note else "")))}
    if window is not None:
        options["window"] = (int, typer.Option(window.default, "--window", help=window.help or "Tokens per window of text."))
    if max_windows is not None:
        options["max_windows"] = (int, typer.Option(max_windows.default, "--max-windows", help=max_windows.help or
                                                    "Most windows, taken round-robin over the texts."))
    return Group(options, build)


# --------------------------------------------------------------------------------------------- prompt
@dataclass(frozen=True)
class PromptOptions:
    """`--prompt` and `--target` (None: the model's top prediction)."""

    prompt: str
    target: str | None


def prompt_group(*, help: str = "The prompt to explain.", target_help: str = "Token to explain, e.g. ' Paris' "
                 "(default: top prediction).") -> Group:
    """The prompt options (decompose, report, identity's attention-source split)."""

    def build(prompt: str, target: str | None) -> PromptOptions:
        if not prompt.strip():
            fail(f"--prompt {prompt!r} is an empty prompt: give one, e.g. 'The capital of France is'")
        return PromptOptions(prompt, target)

    return Group({"prompt": (str, typer.Option("The capital of France is", "--prompt", help=help)),
                  "target": (str, typer.Option(None, "--target", help=target_help))}, build)


# --------------------------------------------------------------------------------------------- output
@dataclass(frozen=True)
class OutputOptions:
    """`--out`: a folder (`suffix` None) or one file ending in `suffix`; None where the output is optional."""

    out: str | None
    suffix: str | None = field(default=None)

    def write(self, files: dict[str, str | bytes]) -> Path:
        """Write the files as one set (`files.write_outputs`): into the folder, or the one file; returns the
        folder (a file: its path). Failures end the command with one line naming the path."""
        from streamlens.files import write_outputs

        assert self.out is not None, "write() needs --out"
        try:
            if self.suffix is None:
                return write_outputs(self.out, files)
            path = Path(self.out)
            (content,) = files.values()
            return write_outputs(path.parent if str(path.parent) else ".", {path.name: content},
                                 set_name=path.name) / path.name
        except (ValueError, OSError) as error:
            fail(_named_error(error, self.out))


def _named_error(error: Exception, out: str) -> str:
    """An OSError that names no file ("[Errno 27] File too large") gets --out's path."""
    if isinstance(error, OSError) and not error.filename:
        return f"cannot write --out {out}: {error.strerror or error}"
    return str(error)


def output_group(*, default: str | None, help: str, suffix: str | None = None) -> Group:
    """`--out`, checked creating nothing (a folder, or a file ending in `suffix`) before any work."""

    def build(out: str | None) -> OutputOptions:
        if out is not None:
            check_out(out, suffix)
        return OutputOptions(out, suffix)

    return Group({"out": (str, typer.Option(default, "--out", help=help))}, build)


@dataclass(frozen=True)
class Sweep:
    """What `ablate` measures, checked: the units, how they are removed, the metrics and the statistics."""

    unit: str
    method: str
    effects: tuple[str, ...]  # ("total",), ("direct",) or ("direct", "total") for --effect both
    cumulative: str
    layers: str | None  # as given (provenance); parsed in layer_list
    heads: str | None
    layer_list: list[int] | None
    head_list: list[int] | None
    metrics: list[str] | None
    positions: str
    seed: int
    batch_size: int | None
    n_boot: int

    @property
    def effect(self) -> str:
        return "both" if len(self.effects) == 2 else self.effects[0]
