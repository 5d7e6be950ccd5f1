"""CtM inside a live ``peft.PeftModel``: the counterpart of PEFT's ``add_weighted_adapter``.

:func:`add_merged_adapter` reads the factors and scalings of already loaded LoRA adapters from
the model's LoRA layers, merges every adapted module with Compress-then-Merge (batched over
same-shape modules: the pipeline of :func:`ctm_kernels.merge`, with the model's layers as its
inputs), and installs the result as a new adapter of rank ``rank`` (``lora_alpha = rank``, so
scaling 1). Like ``add_weighted_adapter`` it does
not activate the new adapter: call ``peft_model.set_adapter(new_adapter_name)``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import torch

from ..api import MergeResult, merge
from ..io.peft import check_config
from ..options import MERGE
from ..io.adapter import Adapter, AdapterError, DictStore, ModuleSpec, check_factor_shapes


def _lora_model(peft_model):
    from peft.tuners.lora import LoraModel

    lora = getattr(peft_model, "base_model", None)
    if not isinstance(lora, LoraModel):
        raise ValueError(f"expected a peft.PeftModel with LoRA adapters, got {type(peft_model).__name__}")
    return lora


def _read_adapter(lora, name: str) -> Adapter:
    """The factors of adapter ``name`` as held by the model's LoRA layers (no copy)."""
    from peft.tuners.lora import LoraLayer

    label = f"adapter {name!r}"
    cfg = lora.peft_config[name]
    cfg_dict = cfg.to_dict()
    check_config({**cfg_dict, "peft_type": "LORA"}, label)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleSpec] = {}
    for mod_name, module in lora.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name in module.lora_A:
            A, B = module.lora_A[name].weight, module.lora_B[name].weight
            kind = "conv" if A.dim() > 2 else "linear"
            a_key, b_key = f"{mod_name}.lora_A.weight", f"{mod_name}.lora_B.weight"
            if getattr(module.lora_B[name], "bias", None) is not None:
                raise AdapterError(f"{label}: {mod_name}.lora_B.bias: trained LoRA bias; cannot merge it exactly")
        elif name in module.lora_embedding_A:
            A, B = module.lora_embedding_A[name], module.lora_embedding_B[name]
            kind = "embedding"
            a_key, b_key = f"{mod_name}.lora_embedding_A", f"{mod_name}.lora_embedding_B"
        else:
            continue
        if getattr(module, "use_dora", {}).get(name) or name in getattr(module, "lora_variant", {}):
            raise AdapterError(f"{label}: {mod_name}: LoRA variant {type(module.lora_variant[name]).__name__} "
                               "(DoRA or other): the update is not scale * B @ A; cannot merge it exactly")
        if "ParamWrapper" in type(module).__name__:
            raise AdapterError(f"{label}: {mod_name}: LoRA on raw parameters is not supported")
        A, B = A.detach(), B.detach()
        rank, m, n = check_factor_shapes(label, mod_name, kind, a_key, b_key, tuple(A.shape), tuple(B.shape))
        tensors[a_key], tensors[b_key] = A, B
        modules[mod_name] = ModuleSpec(
            name=mod_name, kind=kind, a_key=a_key, b_key=b_key, a_shape=tuple(A.shape), b_shape=tuple(B.shape),
            dtype=torch.promote_types(A.dtype, B.dtype), rank=rank, out_features=m, in_features=n,
            alpha=float(module.lora_alpha[name]), scale=float(module.scaling[name]))
    if not modules:
        raise AdapterError(f"{label}: no LoRA layers hold this adapter")
    return Adapter(label=label, format="peft", store=DictStore(tensors, label), modules=modules, config=cfg_dict)


def add_merged_adapter(peft_model, adapter_names: Sequence[str], new_adapter_name: str, **settings) -> MergeResult:
    """Merge the loaded LoRA adapters ``adapter_names`` of ``peft_model`` into a new adapter
    ``new_adapter_name`` of rank ``rank`` with CtM, and install it (not activated). ``rank``
    is capped at ``min(m, n)`` per module, or ``"full"`` (see :func:`ctm_kernels.merge`).

    ``method``, ``weights``, ``beta``, ``scale``, ``stop``, ``tol``, ``max_iter``, ``threads``
    (torch's CPU threads for the merge, restored afterwards; None: the cores this process may
    use, less the busy ones, as ``ctm --threads``), ``pad_rank`` and ``rule_params`` are those
    of :func:`ctm_kernels.merge`. Scalings are read from the LoRA layers
    (``module.scaling``), so rsLoRA, rank/alpha patterns and later ``set_scale`` calls are
    all honoured. Returns the :class:`~ctm_kernels.api.MergeResult` (per-module info and the
    share of each adapter's update kept)."""
    written = sorted(set(settings) & set(_NOT_HERE))
    if written:
        raise TypeError(f"add_merged_adapter() got an unexpected keyword argument {written[0]!r} (the merged "
                        "adapter is installed in the model, not written)")
    lora = _lora_model(peft_model)
    names = list(adapter_names)
    if not names:
        raise ValueError("no adapters to merge")
    for n in names:
        if n not in lora.peft_config:
            raise ValueError(f"adapter {n!r} is not loaded (loaded: {', '.join(lora.peft_config)})")
    if new_adapter_name in lora.peft_config:
        raise ValueError(f"adapter {new_adapter_name!r} already exists")
    adapters = [_read_adapter(lora, n) for n in names]
    res = merge(adapters, **settings)

    base_cfg = lora.peft_config[names[0]]
    merged = res.config()                    # r, and a rank_pattern for modules capped at min(m, n)
    changes = dict(r=merged["r"], lora_alpha=merged["lora_alpha"], use_rslora=False,
                   rank_pattern=merged["rank_pattern"], alpha_pattern=merged["alpha_pattern"],
                   target_modules={mm.name for mm in res.modules}, exclude_modules=None, layers_to_transform=None,
                   layers_pattern=None, modules_to_save=None, use_dora=False, init_lora_weights=True,
                   lora_dropout=0.0)
    fields = {f.name for f in dataclasses.fields(base_cfg)}     # older peft lacks some of them
    new_cfg = dataclasses.replace(base_cfg, **{k: v for k, v in changes.items() if k in fields})
    peft_model.add_adapter(new_adapter_name, new_cfg)
    with torch.no_grad():
        for mm in res.modules:
            module = lora.model.get_submodule(mm.name)
            if mm.kind == "embedding":
                dst_A, dst_B = module.lora_embedding_A[new_adapter_name], module.lora_embedding_B[new_adapter_name]
            else:
                dst_A, dst_B = module.lora_A[new_adapter_name].weight, module.lora_B[new_adapter_name].weight
            if tuple(dst_A.shape) != tuple(mm.A.shape) or tuple(dst_B.shape) != tuple(mm.B.shape):
                raise RuntimeError(f"{mm.name}: PEFT created factors {tuple(dst_A.shape)}/{tuple(dst_B.shape)} "
                                   f"for merged {tuple(mm.A.shape)}/{tuple(mm.B.shape)}")
            dst_A.copy_(mm.A)
            dst_B.copy_(mm.B)
    return res


# settings of ctm_kernels.merge that have no meaning here: the merged factors stay in memory
_NOT_HERE = ("output", "overwrite", "format", "kohya_prefix", "max_group_bytes", "dtype")
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
add_merged_adapter.__signature__ = MERGE.signature(
    [inspect.Parameter(n, _POS) for n in ("peft_model", "adapter_names", "new_adapter_name")], exclude=_NOT_HERE)
