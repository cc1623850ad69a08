"""Text windows that remember which text they came from: held-out splits and confidence intervals by text.

The token-identity probe is scored on texts it was not fitted on, and the tuned lens is evaluated on
texts it was not trained on; both need each window's text. `text_windows` cuts every text into
non-overlapping windows (`data.token_windows`, one text at a time) and keeps the text's index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from streamlens.data import BUILTIN, load_texts, token_windows

if TYPE_CHECKING:
    from streamlens.model import Model


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
        except ValueError as error:
            if "longer than every text" in str(error):
                continue
            raise
        rows.append(windows)
        text_of += [index] * windows.shape[0]
    if not rows:
        raise ValueError(f"window {window} is longer than every text: use a shorter --window")
    name = BUILTIN if source is None else (source if Path(source).suffix.lower() in (".txt", ".jsonl")
                                           else f"string of {len(source)} characters")
    tokens = torch.cat(rows)
    return TextWindows(tokens, torch.tensor(text_of), len(texts),
                       f"{name} ({len(texts)} texts, {tokens.shape[0]} windows of {window} tokens)")
