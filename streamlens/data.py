"""Text sources, token windows and prompt/target sets: what an ablation is measured on.

Sources: a literal string, a `.txt` file (one text), a `.jsonl` file (one `{"text": ...}` a line, or
one `{"prompt": ..., "target": ...}` a line for a prompt set), or the built-in sets shipped in
`data/` (`None` or "builtin": prose and code written for this project; "prompts": prompts whose
target is one SmolLM2 token).

Everything that is scored becomes a `TokenBatch`: token ids, the next token each position predicts
(`labels`), which predictions count (`scored`), which positions are real text (`valid`, False only
for right-padding of prompts of unequal length: a causal model's predictions at real positions never
see the padding to their right, so padding changes nothing that is scored).

Analyses that split by text (the token-identity probe, the tuned lens) take `TextWindows`: every text
cut into windows that remember which text they came from (`text_windows`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

if TYPE_CHECKING:
    from streamlens.model import Model

BUILTIN = "builtin"
BUILTIN_PROMPTS = "prompts"
STDLIB = "stdlib"
CORPUS_SUFFIXES = (".txt", ".md", ".rst", ".py")  # the text files a folder source reads
_TEXT_SUFFIXES = (".txt", ".jsonl")


class TextsTooShortError(ValueError):
    """No text holds one whole window: the window is longer than every text."""


def data_dir() -> Path:
    """The folder with the built-in text set (`texts/*.txt`) and `prompts.jsonl`.

    `streamlens/_data/` in an installed wheel (pyproject's force-include puts it there), else `data/`
    at the repository root (a source checkout or an editable install).
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "_data", package.parent / "data"):
        if (folder / "prompts.jsonl").is_file():
            return folder
    return package.parent / "data"


# ----- loading ----------------------------------------------------------------------------------
def load_texts(source: str | None) -> list[str]:
    """Texts from a source.

    Args:
        source: None or "builtin" for the built-in set; "stdlib" for the Python standard library's
            own source (a code corpus found on every machine); a path ending in `.txt` (the whole file
            is one text) or `.jsonl` (one `{"text": ...}` object a line; blank lines skipped); a folder
            (one text per .txt/.md/.rst/.py file, or per line of its .jsonl files); any other string is
            itself the text.

    Raises:
        ValueError: a missing or empty file, a malformed jsonl line (named by its number), or a
            blank text.
    """
    if source is None or source == BUILTIN:
        folder = data_dir() / "texts"
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise ValueError(f"the built-in text set is missing: no .txt files in {folder}")
        return [path.read_text(encoding="utf-8") for path in files]
    if source == STDLIB:
        return stdlib_texts()
    if not source.strip():
        raise ValueError("empty text: give a non-blank string, a .txt or .jsonl file, a folder, 'builtin' or 'stdlib'")
    path = Path(source).expanduser()
    if _kind(path) == "folder":
        return _folder_texts(path)
    if path.suffix.lower() in _TEXT_SUFFIXES:
        return _read_text_file(path)
    if _kind(path) == "file":
        raise ValueError(f"data file {path} has an unsupported type: use a .txt or .jsonl file")
    if _looks_like_path(source):
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"data path {path} {what}: give a .txt or .jsonl file, 'builtin', 'prompts', "
                         f"or a literal text (one with a space)")
    return [source]


def _looks_like_path(source: str) -> bool:
    """A single word with a slash or a leading ~ or . is a path that went missing, not a text to ablate."""
    return not any(c.isspace() for c in source) and ("/" in source or os.sep in source or source.startswith("~"))


def _kind(path: Path) -> str | None:
    """"folder", "file", or None: nothing there, or no valid file name (e.g. a long literal text)."""
    try:
        return "folder" if path.is_dir() else "file" if path.is_file() else None
    except OSError:  # a name too long for the file system is a text, not a path
        return None


def _folder_texts(path: Path) -> list[str]:
    """One text per file ending in `CORPUS_SUFFIXES` (or one per line of a .jsonl), sorted by path, searched
    recursively; a folder with none of them is an error naming the suffixes."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (*CORPUS_SUFFIXES, ".jsonl"))
    if not files:
        raise ValueError(f"data folder {path} holds no text files ({', '.join(CORPUS_SUFFIXES)}, .jsonl)")
    texts: list[str] = []
    for file in files:
        if file.suffix.lower() == ".jsonl":
            texts += _read_text_file(file)
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                texts.append(text)
    if not texts:
        raise ValueError(f"data folder {path}: every text file is empty")
    return texts


def _read_text_file(path: Path) -> list[str]:
    lines = _read_lines(path)
    if path.suffix.lower() == ".txt":
        text = "\n".join(lines)
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        return [text]
    texts = []
    for number, record in _jsonl_records(path, lines):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{path} line {number}: expected a JSON object with a non-empty "text" string')
        texts.append(text)
    return texts


def load_prompts(path: str | Path | None) -> list[tuple[str, str]]:
    """Prompt/target pairs from a jsonl file of `{"prompt": ..., "target": ...}` lines.

    Args:
        path: the file; None or "prompts" for the built-in `data/prompts.jsonl`.

    Returns:
        `(prompt, target)` pairs; each target is meant to be one token (checked by `prompt_batch`).
    """
    file = data_dir() / "prompts.jsonl" if path is None or path == BUILTIN_PROMPTS else Path(path).expanduser()
    pairs = []
    for number, record in _jsonl_records(file, _read_lines(file)):
        prompt, target = record.get("prompt"), record.get("target")
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(target, str) and target):
            raise ValueError(f'{file} line {number}: expected a JSON object with "prompt" and "target" strings')
        pairs.append((prompt, target))
    return pairs


def is_prompt_source(source: str | None) -> bool:
    """True for "prompts" or a `.jsonl` file whose first record has a "prompt" key."""
    if source == BUILTIN_PROMPTS:
        return True
    if source is None or not source.lower().endswith(".jsonl") or _kind(Path(source).expanduser()) != "file":
        return False
    for _, record in _jsonl_records(Path(source).expanduser(), _read_lines(Path(source).expanduser())):
        return "prompt" in record
    return False


def check_source(source: str | None) -> None:
    """Read a text or prompt source once, so that a bad one fails before the model loads."""
    if is_prompt_source(source):
        load_prompts(source)
    else:
        load_texts(source)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"data file {path} {what}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    if not any(line.strip() for line in lines):
        raise ValueError(f"data file {path} is empty")
    return lines


def _jsonl_records(path: Path, lines: list[str]):
    """Yield (line number, JSON object) for each non-blank line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


# ----- tokens -----------------------------------------------------------------------------------
def token_windows(model: "Model", texts: list[str], window: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut each text's tokens into consecutive, non-overlapping windows of `window` tokens.

    A text's last partial window is dropped. Windows are taken round-robin over the texts (first
    window of every text, then the second, ...) so that `max_windows` keeps a mix of all texts.

    Returns:
        token ids [n_windows, window], int64, on the model's device.
    """
    if window < 2:
        raise ValueError(f"window {window} too short: a window needs at least 2 tokens (one prediction)")
    if window > model.info.n_ctx:
        raise ValueError(f"window {window} is longer than the model's context of {model.info.n_ctx} tokens")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max-windows {max_windows} must be at least 1")
    per_text = []
    for text in texts:
        ids = model.tokenizer(text).input_ids
        per_text.append([ids[start : start + window] for start in range(0, len(ids) - window + 1, window)])
    chosen = [windows[k] for k in range(max(map(len, per_text), default=0)) for windows in per_text if k < len(windows)]
    if not chosen:
        longest = max((len(model.tokenizer(text).input_ids) for text in texts), default=0)
        raise TextsTooShortError(f"window {window} is longer than every text (the longest has {longest} tokens)")
    tokens = torch.tensor(chosen[:max_windows], dtype=torch.long, device=model.device)
    return model.check_tokens(tokens)


@dataclass(frozen=True)
class TokenBatch:
    """Texts to run and the predictions to score.

    Shapes: tokens, labels, scored, valid [n_texts, pos]; targets [n_texts] or None.
    `labels[i, p]` is the token position p should predict (-1 where there is none); `scored` marks
    the predictions that enter the metrics (always a subset of `labels >= 0`); `targets` (prompt
    sets) is the single token scored for each prompt, equal to its label at the scored position.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    scored: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor | None
    description: str

    @property
    def n_texts(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def rows(self, index: torch.Tensor | slice) -> "TokenBatch":
        """The sub-batch of some texts (same positions)."""
        targets = None if self.targets is None else self.targets[index]
        return TokenBatch(self.tokens[index], self.labels[index], self.scored[index], self.valid[index], targets,
                          self.description)


def window_batch(tokens: torch.Tensor, positions: str = "all", description: str = "") -> TokenBatch:
    """Score next-token predictions of equal-length windows `tokens` [n, pos].

    Args:
        positions: which predictions count, indexing the pos-1 predictions (position p predicts
            token p+1): "all", "last", or a slice "a:b" / "a:" / ":b" (negative ends allowed).
    """
    n_texts, length = tokens.shape
    labels = torch.full_like(tokens, -1)
    labels[:, :-1] = tokens[:, 1:]
    chosen = torch.zeros(length, dtype=torch.bool, device=tokens.device)
    chosen[: length - 1][parse_positions(positions, length - 1)] = True
    if not chosen.any():
        raise ValueError(f"positions {positions!r} select no prediction in windows of {length} tokens "
                         f"({length - 1} predictions)")
    scored = chosen.expand(n_texts, length).clone()
    valid = torch.ones_like(scored)
    return TokenBatch(tokens, labels, scored, valid, None, description)


def parse_positions(positions: str, n_predictions: int) -> slice:
    """"all" | "last" | "a:b" -> a slice over `n_predictions` predictions."""
    text = positions.strip().lower()
    if text == "all":
        return slice(None)
    if text == "last":
        return slice(n_predictions - 1, n_predictions)
    start, colon, stop = text.partition(":")
    try:
        if colon:
            return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        pass
    raise ValueError(f"positions {positions!r} not understood: use all, last, or a slice such as 8: or 0:32")


def prompt_batch(model: "Model", prompts: list[tuple[str, str]], description: str = "") -> TokenBatch:
    """Score the target token after each prompt (one prediction per prompt).

    Prompts of unequal length are right-padded with the first prompt's first token; `valid` marks
    the real tokens. Each target must be a single token (`model.token_id` raises otherwise).
    """
    if not prompts:
        raise ValueError("the prompt set is empty")
    ids = [model.to_tokens(prompt)[0] for prompt, _ in prompts]
    targets = torch.tensor([model.token_id(target) for _, target in prompts], dtype=torch.long, device=model.device)
    length = max(len(row) for row in ids)
    tokens = torch.full((len(ids), length), int(ids[0][0]), dtype=torch.long, device=model.device)
    labels = torch.full_like(tokens, -1)
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    valid = torch.zeros_like(scored)
    for row, prompt_ids in enumerate(ids):
        last = len(prompt_ids) - 1
        tokens[row, : last + 1] = prompt_ids
        labels[row, :last] = prompt_ids[1:]
        labels[row, last] = targets[row]
        scored[row, last] = True
        valid[row, : last + 1] = True
    return TokenBatch(model.check_tokens(tokens), labels, scored, valid, targets, description)


def load_batch(
    model: "Model",
    source: str | None,
    window: int = 64,
    max_windows: int | None = 16,
    positions: str = "all",
) -> TokenBatch:
    """The batch for a data source: a prompt set (see `is_prompt_source`) or text windows."""
    if is_prompt_source(source):
        if positions.strip().lower() != "all":
            raise ValueError(f"positions {positions!r} apply to text windows; a prompt set is scored at "
                             f"each prompt's last position")
        prompts = load_prompts(source)
        return prompt_batch(model, prompts, description=f"{source} ({len(prompts)} prompts)")
    texts = load_texts(source)
    tokens = token_windows(model, texts, window, max_windows)
    name = BUILTIN if source is None else (source if Path(source).suffix.lower() in _TEXT_SUFFIXES
                                           else f"string of {len(source)} characters")
    return window_batch(tokens, positions, description=f"{name} ({tokens.shape[0]} windows of {window} tokens)")


# Text windows that remember which text they came from: the token-identity probe is scored on texts it
# was not fitted on and the tuned lens is evaluated on texts it was not trained on; both need each
# window's text (and confidence intervals resample by text).


@dataclass(frozen=True)
class TextWindows:
    """Token windows [window, pos] and, per window, the index of its text (`text_of` [window])."""

    tokens: Int[torch.Tensor, "window pos"]
    text_of: Int[torch.Tensor, "window"]
    n_texts: int
    description: str

    def of_texts(self, texts: torch.Tensor) -> "TextWindows":
        """The windows whose text is in `texts` (a 1-d tensor of text indices)."""
        keep = torch.isin(self.text_of, texts.to(self.text_of.device))
        return TextWindows(self.tokens[keep], self.text_of[keep], self.n_texts, self.description)

    def split(self, every: int = 5) -> tuple["TextWindows", "TextWindows"]:
        """(train, held out): every `every`-th text (indices every-1, 2*every-1, ...) is held out."""
        texts = torch.arange(self.n_texts)
        held = texts[texts % every == every - 1]
        if len(held) == 0 or len(held) == self.n_texts:
            raise ValueError(f"{self.n_texts} texts cannot be split holding out every {every}th: need at least "
                             f"{every} texts")
        return self.of_texts(texts[texts % every != every - 1]), self.of_texts(held)


def text_windows(model: "Model", source: str | None = None, window: int = 64,
                 max_per_text: int | None = None) -> TextWindows:
    """Every text of `source` (see `data.load_texts`) cut into windows of `window` tokens.

    Texts shorter than one window are left out; at least one window overall is required.
    """
    texts = load_texts(source)
    rows, text_of = [], []
    for index, text in enumerate(texts):
        try:
            windows = token_windows(model, [text], window, max_per_text)
        except TextsTooShortError:  # this text is shorter than one window: leave it out
            continue
        rows.append(windows)
        text_of += [index] * windows.shape[0]
    if not rows:
        raise ValueError(f"window {window} is longer than every text: use a shorter --window")
    name = BUILTIN if source is None else (source if Path(source).suffix.lower() in (".txt", ".jsonl")
                                           else f"string of {len(source)} characters")
    tokens = torch.cat(rows)
    return TextWindows(tokens, torch.tensor(text_of), len(texts),
                       f"{name} ({len(texts)} texts, {tokens.shape[0]} windows of {window} tokens)")


# ----- held-out corpora (streamlens prune: choose on one set of texts, judge on another) ---------


def stdlib_texts() -> list[str]:
    """The Python standard library's own top-level modules (`Lib/*.py`), one text per file, sorted by name.

    A code corpus found on every machine that runs streamlens (PSF licence), several MB: far more
    than the 50k tokens a held-out evaluation needs. Its text depends on the Python version, which
    every result's provenance records.
    """
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in folder.glob("*.py") if path.is_file())
    if not files:
        raise ValueError(f"no standard-library sources in {folder}: pass --eval-data a .txt, .jsonl or folder")
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    return [text for text in texts if text.strip()]


def corpus_batch(model: "Model", source: str | None, window: int = 64, max_windows: int | None = 16) -> TokenBatch:
    """Text windows of a corpus source (`load_texts`), every prediction scored."""
    texts = load_texts(source)
    tokens = token_windows(model, texts, window, max_windows)
    name = BUILTIN if source is None else source
    return window_batch(tokens, "all", description=f"{name} ({tokens.shape[0]} windows of {window} tokens)")


def window_hashes(tokens: torch.Tensor) -> list[str]:
    """sha256 (hex, 16 characters) of each window's token ids [n, pos] -> [n] (equal windows, equal hashes)."""
    import hashlib

    rows = tokens.detach().to("cpu", torch.int64).numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows]


def check_disjoint(choice: TokenBatch, evaluation: TokenBatch) -> None:
    """Refuse evaluation windows that also occur among the choice windows (hashed token ids).

    Raises:
        ValueError: naming how many windows are shared.
    """
    seen = set(window_hashes(choice.tokens))
    shared = sum(digest in seen for digest in window_hashes(evaluation.tokens))
    if shared:
        raise ValueError(f"{shared} of the {evaluation.n_texts} evaluation windows also occur in the choice data: "
                         f"choose and judge on different texts (e.g. --data builtin --eval-data stdlib)")
