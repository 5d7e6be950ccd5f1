"""kohya-ss / diffusers-style LoRA files: one ``.safetensors`` with, per module ``<name>``,
``<name>.lora_down.weight`` (A: ``[r, in]``, conv ``[r, in, *kernel]``), ``<name>.lora_up.weight``
(B: ``[out, r]``, conv ``[out, r, 1, ...]``) and an optional scalar ``<name>.alpha``. The
update is ``(alpha / r) * up @ down``; a missing alpha means ``alpha = r`` (scale 1), as
kohya's loaders assume.

Module names are kept as written (``lora_unet_down_blocks_0_..._to_q``): kohya flattens the
module path with underscores, which cannot be undone reliably. When a PEFT module path is
written in this format it becomes ``<prefix>_<path with . replaced by _>`` (prefix
``lora_unet`` by default, ``lora_te`` for text encoders); a name that already is a kohya
name (no dots, starts with ``lora_``) is written unchanged.

Other kohya/LyCORIS networks (DoRA ``dora_scale``, LoCon ``lora_mid``, LoHa ``hada_*``,
LoKr ``lokr_*``, full ``diff`` weights) are refused with the file and key.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Mapping

import torch

from ..options import DEFAULT_KOHYA_PREFIX
from .adapter import (FLOAT_DTYPES, Adapter, AdapterError, DictStore, MergedModule, ModuleSpec, TensorStore,
                      check_factor_shapes)
from .safetensors_io import SafetensorsStore

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

_REFUSED = {
    "dora_scale": "DoRA magnitude (dora_scale): the update is not up @ down",
    "lora_mid": "LoCon Tucker core (lora_mid) is not supported",
    "hada_": "LoHa (Hadamard product) network, not LoRA",
    "lokr_": "LoKr (Kronecker product) network, not LoRA",
    ".diff": "full weight difference, not LoRA factors",
    ".bias": "trained bias: it cannot be merged into LoRA factors",
}


def _refusal(key: str) -> str:
    for marker, why in _REFUSED.items():
        if marker in key:
            return f"{why}; cannot merge it exactly"
    if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
        return ("PEFT-style key (lora_A/lora_B) without an adapter_config.json next to the file: "
                "the scaling is unknown; pass the PEFT adapter folder instead")
    return "not a kohya LoRA key (<module>.lora_down.weight / .lora_up.weight / .alpha)"


def read_kohya_tensors(store: TensorStore, label: str) -> Adapter:
    """Describe the modules of a kohya LoRA held by ``store``."""
    parts: dict[str, dict[str, str]] = {}
    for key in store.keys():
        for suffix, which in ((DOWN, "A"), (UP, "B"), (ALPHA, "alpha")):
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[which] = key
                break
        else:
            raise AdapterError(f"{label}: {key}: {_refusal(key)}")
    modules: dict[str, ModuleSpec] = {}
    alphas = store.get([p["alpha"] for p in parts.values() if "alpha" in p])    # one read for all
    for name, p in parts.items():
        for which, suffix in (("A", DOWN), ("B", UP)):
            if which not in p:
                have = next(iter(p.values()))
                raise AdapterError(f"{label}: {have}: {name}{suffix} is missing")
        a_key, b_key = p["A"], p["B"]
        a_shape, b_shape = store.shape(a_key), store.shape(b_key)
        kind = "conv" if len(a_shape) > 2 else "linear"
        rank, m, n = check_factor_shapes(label, name, kind, a_key, b_key, a_shape, b_shape)
        for key in (a_key, b_key):
            if store.dtype(key) not in FLOAT_DTYPES:
                raise AdapterError(f"{label}: {key}: dtype {store.dtype(key)} is not a float type")
        alpha = float(rank)
        if "alpha" in p:
            t = alphas[p["alpha"]]
            if t.numel() != 1 or not bool(torch.isfinite(t.double()).all()):
                raise AdapterError(f"{label}: {p['alpha']}: expected one finite number, got shape "
                                   f"{tuple(t.shape)}")
            alpha = float(t.double().item())
        modules[name] = ModuleSpec(
            name=name, kind=kind, a_key=a_key, b_key=b_key, a_shape=a_shape, b_shape=b_shape,
            dtype=torch.promote_types(store.dtype(a_key), store.dtype(b_key)), rank=rank,
            out_features=m, in_features=n, alpha=alpha, scale=alpha / rank)
    if not modules:
        raise AdapterError(f"{label}: no LoRA factors (no *.lora_down.weight / *.lora_up.weight keys)")
    return Adapter(label=label, format="kohya", store=store, modules=modules,
                   config={"ss_metadata": dict(getattr(store, "metadata", {}) or {})},
                   source=getattr(store, "path", None))


def read_kohya(path: str | os.PathLike) -> Adapter:
    """Open a kohya LoRA ``.safetensors`` file."""
    return read_kohya_tensors(SafetensorsStore(path), str(path))


def read_kohya_state_dict(state_dict: Mapping[str, torch.Tensor], label: str) -> Adapter:
    return read_kohya_tensors(DictStore(state_dict, label), label)


def kohya_name(name: str, prefix: str = DEFAULT_KOHYA_PREFIX) -> str:
    """kohya module name of a module path (a kohya name is returned unchanged)."""
    if "." not in name and name.startswith("lora_"):
        return name
    return f"{prefix}_{name.replace('.', '_')}"


def kohya_tensors(modules: list[MergedModule], prefix: str = DEFAULT_KOHYA_PREFIX) -> dict[str, torch.Tensor]:
    """kohya state dict of merged modules: ``lora_down = A``, ``lora_up = B``, ``alpha = rank``
    (fp32 scalar, so the scale is exactly 1 whatever the factor dtype)."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for mm in modules:
        if mm.kind == "embedding":
            raise ValueError(f"{mm.name}: embedding LoRA has no kohya representation; use the PEFT format")
        k = kohya_name(mm.name, prefix)
        if k in owner:
            raise ValueError(f"modules {owner[k]} and {mm.name} both map to the kohya name {k}")
        owner[k] = mm.name
        out[k + DOWN] = mm.A
        out[k + UP] = mm.B
        out[k + ALPHA] = torch.tensor(float(mm.rank), dtype=torch.float32)
    return out


def match_kohya_names(adapters: list[Adapter], problem: Callable) -> list[Adapter]:
    """Adapters whose modules are named alike. kohya names are module paths with ``.`` replaced
    by ``_`` behind a prefix (``lora_unet_``, ``lora_te_``); mixed with PEFT inputs, each kohya
    module is renamed to the one PEFT module path it flattens to, and refused when it matches
    none or several (``problem(message, AdapterError)``)."""
    peft_names = {n for a in adapters if a.format == "peft" for n in a.modules}
    if not peft_names or all(a.format == "peft" for a in adapters):
        return adapters
    flat = {}
    for n in peft_names:
        flat.setdefault(n.replace(".", "_"), []).append(n)
    out = []
    for ad in adapters:
        if ad.format != "kohya":
            out.append(ad)
            continue
        renamed = {}
        for k, spec in ad.modules.items():
            hits = [p for f, ps in flat.items() for p in ps
                    if k.endswith("_" + f) and k[: -len(f) - 1].startswith("lora")]
            if len(hits) != 1:
                why = "matches no module path" if not hits else f"matches several module paths ({', '.join(sorted(hits))})"
                problem(f"{ad.label}: {spec.a_key}: kohya module {k} {why} of the PEFT inputs; adapters of "
                        "different formats merge only when every kohya module maps to one PEFT module",
                        AdapterError)
                continue
            renamed[hits[0]] = replace(spec, name=hits[0])
        out.append(replace(ad, modules=renamed))
    return out
