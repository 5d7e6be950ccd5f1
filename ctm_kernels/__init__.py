"""ctm_kernels: merge many LoRA adapters into one rank-r LoRA with Compress-then-Merge.

Public API: :func:`merge` (adapter files or state dicts in, a merged adapter out),
:func:`merge_layer`, :func:`prepare`, :func:`merge_layers`, :func:`prepare_layers`
(tensors in, tensors out) and the merge-rule registry :data:`RULES`.
"""
from .api import MergeResult, MergeStats, inspect_adapter, merge
from .engine import LayerInfo, MergedLayer, Plan, merge_layer, merge_layers, prepare, prepare_layers
from .io import AdapterError
from .rules import RULES, apply_rule, describe as describe_rules

__version__ = "0.1.0"

__all__ = ["merge", "MergeResult", "MergeStats", "inspect_adapter", "AdapterError", "merge_layer", "merge_layers", "prepare", "prepare_layers", "MergedLayer", "LayerInfo", "Plan",
           "RULES", "apply_rule", "describe_rules", "__version__"]
