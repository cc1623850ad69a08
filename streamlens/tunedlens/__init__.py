"""The tuned lens (Belrose et al. 2023): an affine translator per layer, trained so that reading the
stream at that layer through the final norm and unembedding matches the model's output.

- `tunedlens.train`: `train_tuned_lens(model, tokens) -> TunedLens` (identity-initialised, Adam, seeded);
- `tunedlens.evaluate`: `compare_lenses(model, held_out_tokens, lens) -> LensComparison`;
- `tunedlens.texts`: which texts train and evaluate a lens (by sha256): evaluation never reads training texts.

`TunedLens.identity(...)` is the untrained lens: it equals the logit lens exactly.
"""

from streamlens.results.tunedlens import LENSES, LensComparison, TunedLens
from streamlens.tunedlens.evaluate import check_lens, compare_lenses
from streamlens.tunedlens.texts import LensTexts, evaluation_texts, record_texts, text_hash, training_split
from streamlens.tunedlens.train import (MAX_LR, LensDivergedError, check_converged, check_lr, kl_from_final,
                                        stage_streams, train_tuned_lens)

__all__ = ["LENSES", "MAX_LR", "LensComparison", "LensDivergedError", "LensTexts", "TunedLens", "check_converged",
           "check_lens", "check_lr", "compare_lenses", "evaluation_texts", "kl_from_final", "record_texts",
           "stage_streams", "text_hash", "train_tuned_lens", "training_split"]
