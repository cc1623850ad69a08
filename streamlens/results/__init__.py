"""Frozen result objects: tensors plus the labels and provenance that explain them.

Every analysis returns one of these. Each can `save(path)` (tensors to safetensors, everything else
to the file's JSON metadata), be read back with `load(path)`, and give a tidy long-format
`to_dataframe()`. base.py: the base class and provenance; stream.py: writes, decomposition, lens;
ablation.py: ablation sweeps; highway.py: the gradient highway; check.py: `streamlens check`.
"""

from streamlens.results.ablation import AblationResult, CumulativeAblation
from streamlens.results.check import ModelCheck
from streamlens.results.highway import RealHighway, ToyConfig, ToyHighway
from streamlens.results.base import Provenance, Result, command_line, frame, package_version
from streamlens.results.stream import Components, LogitDecomposition, LogitLens, StreamWrites

__all__ = ["AblationResult", "Components", "CumulativeAblation", "LogitDecomposition", "LogitLens", "ModelCheck",
           "Provenance",
           "RealHighway", "Result", "StreamWrites", "ToyConfig", "ToyHighway", "command_line", "frame", "package_version"]
