"""MFI-ResNet compression (Sun et al., arXiv 2511.12422; METHODS §5): ResNet stages replaced by
MeanFlow modules, selected stages incubated back, the hybrid fine-tuned.

Public API:

* :func:`load_compressed` — ``model = load_compressed("runs/00001-compress-resnet56/hybrid.safetensors")``
* :class:`MeanFlowModule`, :class:`ModuleSpec` — the module that replaces a stage
* :func:`count_params` — ``sum(p.numel())``, the count the report uses
"""

from mfcli.compress.arch import load_compressed, save_compressed
from mfcli.compress.modules import MeanFlowModule, ModuleSpec, count_params

__all__ = ["load_compressed", "save_compressed", "MeanFlowModule", "ModuleSpec", "count_params"]
