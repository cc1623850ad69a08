"""Token identity: how much of the input token (and the one before it) each stage's stream still carries.

- `identity.probe`: a closed-form ridge probe for token ids (`fit_probe -> Probe`);
- `identity.measure`: `token_identity(model, windows, removed=(0, 10, 20)) -> TokenIdentity`, with the
  skip around chosen blocks removed as a counterfactual.
"""

from streamlens.identity.measure import MAX_ALPHA, check_alpha, stage_features, token_identity, word_starts
from streamlens.identity.probe import Probe, fit_probe
from streamlens.results.identity import MEASURES, SPLITS, TARGETS, TokenIdentity

__all__ = ["MAX_ALPHA", "MEASURES", "Probe", "SPLITS", "TARGETS", "TokenIdentity", "check_alpha", "fit_probe", "stage_features", "token_identity",
           "word_starts"]
