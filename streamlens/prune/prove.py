"""Export the chosen removal and prove the export: its logits against the engine's simulated removal.

`export` deletes the blocks from a fresh HF copy of the model (`model.export.drop_blocks`) and saves
the folder atomically (plus, on request, a GGUF file inside it). `prove` loads what was written the
way a user would, with transformers alone, with `streamlens.load_model` (whose load-time check
compares the bridge with HF), and the GGUF file with transformers' GGUF reader, and compares each
one's logits with those of the original model with the same blocks zero-removed (`ablation.ablated`),
on held-out windows: max |exported - simulated| / max |simulated|.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from streamlens import ablation as A
from streamlens.model import Model, load_model
from streamlens.model import export as E
from streamlens.prune.choose import unit_sites
from streamlens.results import Provenance, command_line
from streamlens.results.prune import ExportCheck

TOLERANCE = E.LOGIT_TOLERANCE


def export(model: Model, blocks: Sequence[int], folder: str | os.PathLike[str], gguf: bool = False,
           command: str | None = None, run_id: str | None = None) -> Path:
    """Write `model` with `blocks` deleted as an HF folder at `folder` (and a GGUF file inside it with `gguf`).

    The weights come from the model's own source (an HF folder, or the cached safetensors of a GGUF
    model), in the model's dtype. Raises `ExportRefused` when the config cannot express the removal
    and `ValueError` for a folder that exists and is not empty.
    """
    E.check_export_folder(folder)
    hf_model, tokenizer = E.load_hf(model.info.source, model.info.dtype)
    pruned = E.drop_blocks(hf_model, blocks)
    del hf_model
    facts = {"removed_blocks": sorted(int(b) for b in blocks), "source_model": model.info.name,
             "source_weights_sha256": model.info.weights_hash, "n_layers_before": model.n_layers,
             "n_layers_after": model.n_layers - len(blocks), "command": command or command_line(),
             **({"run_id": run_id} if run_id else {})}
    return E.save_folder(pruned, tokenizer, folder, facts, gguf_name=E.GGUF_NAME if gguf else None)


def simulated_logits(model: Model, blocks: Sequence[int], tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Logits [n, pos, d_vocab] of `model` with `blocks` zero-removed (total effect), `batch_size` windows a run."""
    with torch.inference_mode(), A.ablated(model, A.Ablation(unit_sites("greedy", blocks))):
        return torch.cat([model.run(tokens[start:start + batch_size]) for start in range(0, tokens.shape[0],
                                                                                        batch_size)])


relative = E.relative_difference


def prove(model: Model, folder: str | os.PathLike[str], blocks: Sequence[int], tokens: torch.Tensor,
          data: str = "", command: str | None = None) -> ExportCheck:
    """Compare the exported folder (and its GGUF file, when there is one) with the simulated removal.

    Args:
        tokens: held-out windows [n, pos] (keep n small: three sets of [n, pos, d_vocab] logits are held).
    """
    folder = Path(folder)
    reference = simulated_logits(model, blocks, tokens)
    dtype = model.info.dtype
    from_hf = relative(E.folder_logits(folder, tokens, dtype), reference)
    loaded = load_model(str(folder), dtype=dtype, device=model.info.device)
    with torch.inference_mode():
        from_streamlens = relative(torch.cat([loaded.run(tokens[start:start + 4])
                                              for start in range(0, tokens.shape[0], 4)]), reference)
    n_after = loaded.n_layers
    del loaded
    gguf_file = folder / E.GGUF_NAME
    from_gguf = relative(E.folder_logits(gguf_file, tokens, dtype), reference) if gguf_file.is_file() else None
    tolerance = TOLERANCE[dtype]
    return ExportCheck(Provenance.of(model, command or command_line()), str(folder), tuple(sorted(blocks)),
                       model.n_layers, n_after, from_hf, from_streamlens, from_gguf,
                       str(gguf_file) if from_gguf is not None else None, tolerance,
                       E.gguf_tolerance(dtype), int(tokens.shape[0]), data)
