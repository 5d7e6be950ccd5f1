"""ctm_kernels: merge many LoRA adapters into one rank-r LoRA with Compress-then-Merge.

Public API: :func:`merge` (adapter files or state dicts in, a merged adapter out),
:func:`plan_merge` (the same arguments, a dry run that reads no factor),
:func:`merge_layer`, :func:`prepare`, :func:`merge_layers`, :func:`prepare_layers`
(tensors in, tensors out) and the merge-rule registry :data:`RULES`.

The names are imported on first use, so that ``ctm --help`` and ``ctm --version`` do not
wait for torch.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "merge": ("api", "merge"), "plan_merge": ("api", "plan_merge"), "MergeResult": ("api", "MergeResult"),
    "MergeStats": ("api", "MergeStats"), "MergePlan": ("api", "MergePlan"), "inspect_adapter": ("api", "inspect_adapter"),
    "AdapterError": ("io", "AdapterError"),
    "LayerInfo": ("engine", "LayerInfo"), "MergedLayer": ("engine", "MergedLayer"),
    "PreparedLayer": ("engine", "PreparedLayer"),
    "merge_layer": ("engine", "merge_layer"), "merge_layers": ("engine", "merge_layers"),
    "prepare": ("engine", "prepare"), "prepare_layers": ("engine", "prepare_layers"),
    "RULES": ("rules", "RULES"), "apply_rule": ("rules", "apply_rule"), "describe_rules": ("rules", "describe"),
}


def __getattr__(name):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "__version__"]
