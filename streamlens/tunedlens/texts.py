"""Which texts a tuned lens is trained and evaluated on, named by their sha256, so an evaluation never
scores training texts as held out.

`lens train` holds out every n-th text (of the built-in texts; of other data when it has n texts or more,
else it is used whole); the lens keeps
the sha256 of every training and held-out text. `lens eval` reads the lens's own held-out texts by
default and refuses any text it was trained on, whatever `--data` and `--hold-out-every` say.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamlens.data import BUILTIN, TextWindows, load_texts, text_windows

if TYPE_CHECKING:
    from streamlens.model import Model
    from streamlens.results.tunedlens import TunedLens


@dataclass(frozen=True)
class LensTexts:
    """Token windows [window, pos] and the sha256 of each text they come from (sorted by text index)."""

    windows: TextWindows
    hashes: tuple[str, ...]


def text_hash(text: str) -> str:
    """sha256 of a text's utf-8 bytes, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _named(windows: TextWindows, texts: list[str]) -> LensTexts:
    return LensTexts(windows, tuple(text_hash(texts[int(index)]) for index in windows.text_of.unique()))


def training_split(model: "Model", data: str | None, window: int, hold_out_every: int) -> tuple[LensTexts, LensTexts | None]:
    """(training texts, held-out texts): every `hold_out_every`-th text is held out (the built-in texts always;
    other data when it has at least `hold_out_every` texts, else it is used whole and held-out is None)."""
    texts = load_texts(data)
    windows = text_windows(model, data, window)
    if data not in (None, BUILTIN) and len(texts) < hold_out_every:
        return _named(windows, texts), None
    train, held = windows.split(hold_out_every)
    return _named(train, texts), _named(held, texts)


def evaluation_texts(model: "Model", lens: "TunedLens", data: str | None, window: int,
                     hold_out_every: int) -> LensTexts:
    """The texts to evaluate `lens` on: by default (data None) its own held-out texts; with `data`, that data
    (the built-in texts: their every `hold_out_every`-th). Raises ValueError when a text is one it was trained on."""
    if data is None:
        if not lens.held_out_texts:
            raise ValueError(f"the lens was trained on all of --data {_short(lens.data)!r} and has no held-out texts: "
                             f"give --data with texts it was not trained on")
        own = lens.data or BUILTIN
        chosen = training_split(model, own, window, lens.hold_out_every)[1]
        if chosen is None or not set(chosen.hashes) <= set(lens.held_out_texts):
            raise ValueError(f"the held-out texts of {_short(own)!r} are not those the lens recorded (the texts "
                             f"changed since it was trained): give --data explicitly")
    else:
        texts = load_texts(data)
        windows = text_windows(model, data, window)
        chosen = _named(windows.split(hold_out_every)[1] if data == BUILTIN else windows, texts)
    overlap = set(chosen.hashes) & set(lens.train_texts)
    if overlap:
        how = (f"it held out every {_ordinal(lens.hold_out_every)} text of" if lens.hold_out_every
               else "it was trained on all of")
        raise ValueError(f"{len(overlap)} of the {len(chosen.hashes)} evaluation texts were used to train the lens "
                         f"({how} {_short(lens.data)!r}): evaluate on its own held-out texts (leave out --data) or "
                         f"on other texts")
    return chosen


def _ordinal(n: int) -> str:
    """2 -> '2nd', 5 -> '5th', 21 -> '21st'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _short(text: str | None) -> str:
    text = text or BUILTIN
    return text if len(text) <= 60 else text[:57] + "..."


def record_texts(lens: "TunedLens", data: str | None, window: int, hold_out_every: int, train: LensTexts,
                 held: LensTexts | None) -> "TunedLens":
    """The lens with the data it was trained on and the sha256 of its training and held-out texts."""
    import dataclasses

    return dataclasses.replace(lens, data=data or BUILTIN, window=window,
                               hold_out_every=hold_out_every if held is not None else 0,
                               train_texts=train.hashes, held_out_texts=held.hashes if held is not None else ())
