"""The tuned lens (Belrose et al. 2023): an affine translator per layer, trained so that reading the
stream at that layer through the final norm and unembedding matches the model's output.

- `tunedlens.train`: `train_tuned_lens(model, tokens) -> TunedLens` (identity-initialised, Adam, seeded);
- `tunedlens.evaluate`: `compare_lenses(model, held_out_tokens, lens) -> LensComparison`.

`TunedLens.identity(...)` is the untrained lens: it equals the logit lens exactly.
"""

from streamlens.results.tunedlens import LENSES, LensComparison, TunedLens
from streamlens.tunedlens.evaluate import check_lens, compare_lenses
from streamlens.tunedlens.train import kl_from_final, stage_streams, train_tuned_lens

__all__ = ["LENSES", "LensComparison", "TunedLens", "check_lens", "compare_lenses", "kl_from_final", "stage_streams",
           "train_tuned_lens"]
