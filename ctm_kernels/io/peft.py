"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading follows PEFT's own rules (checked against peft 0.21):

* keys are ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
  ``[out, r]``; embeddings store ``<module>.lora_embedding_A`` ``[r, num_embeddings]`` and
  ``<module>.lora_embedding_B`` ``[embedding_dim, r]``; conv layers store ``lora_A.weight``
  ``[r, in, *kernel]`` and ``lora_B.weight`` ``[out, r, 1, ...]``. In every case the update is
  ``scale * B @ A`` as a map from inputs (for an embedding: one-hot token ids) to outputs,
  so B and A are the engine's B and A as stored. The base weight an update is added to may
  be stored transposed (``nn.Embedding`` rows are tokens; GPT-2 ``Conv1D`` with
  ``fan_in_fan_out`` stores ``[in, out]``); PEFT transposes when it folds the update in, the
  factors themselves are not transposed.
* ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; per module,
  ``r`` and ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern``: the first pattern
  key ``k`` (in the config's order) for which ``re.match(rf"(.*\\.)?({k})$", module)``
  matches, as in ``peft.utils.other.get_pattern_key``.

Anything the merged LoRA could not reproduce exactly is refused with the file and key:
DoRA magnitudes, trained biases (``bias`` other than ``"none"``), ``modules_to_save``, trainable tokens, LoRA on raw
parameters, other LoRA variants, non-LoRA PEFT types, pickled ``.bin`` weights.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .adapter import (FLOAT_DTYPES, Adapter, AdapterError, DictStore, MergedModule, ModuleSpec, TensorStore,
                      check_factor_shapes)
from .safetensors_io import SafetensorsStore

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."

# config fields whose (truthy) value makes the adapter something a plain merged LoRA cannot
# reproduce, with the reason
_REFUSED_FIELDS = {
    "use_dora": "DoRA rescales each output column by a learned magnitude; the update is not B @ A",
    "lora_bias": "the adapter trains a bias on lora_B, which a merged LoRA has no place for",
    "modules_to_save": "the adapter saves full trained copies of these modules",
    "trainable_token_indices": "the adapter trains token embedding deltas, not LoRA factors",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters) is not supported",
    "layer_replication": "layer replication changes the model's structure",
    "use_qalora": "QALoRA pools the input before lora_A; the update is not B @ A",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
    "velora_config": "VeLoRA adapters are not supported",
    "monteclora_config": "MonteCLoRA samples its factors",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routes between adapters per token",
    "kasa_config": "KaSA inserts a diagonal between A and B",
}


def pattern_key(patterns, module: str, *, label: str = "", field_name: str = "") -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to ``module`` (PEFT's rule:
    the first key ``k`` such that ``re.match(rf"(.*\\.)?({k})$", module)``), or None."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as e:
            raise AdapterError(f"{label}: {field_name}: pattern {key!r} is not a valid regex ({e})") from None
    return None


def _config_error(label: str, key: str, problem: str) -> AdapterError:
    return AdapterError(f"{label}: {key}: {problem}")


def _read_config(folder: Path) -> tuple[dict, str]:
    path = folder / CONFIG_NAME
    label = str(path)
    if not path.is_file():
        raise AdapterError(f"{label}: missing (a PEFT adapter folder needs {CONFIG_NAME})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}: expected a JSON object")
    return cfg, label


def check_config(cfg: Mapping, label: str) -> dict:
    """Validated LoRA settings of a PEFT config: ``r``, ``lora_alpha``, ``use_rslora``,
    ``rank_pattern``, ``alpha_pattern`` (PEFT's defaults where a field is absent)."""
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _config_error(label, "peft_type", f"{peft_type!r} is not a LoRA adapter")
    for name, why in _REFUSED_FIELDS.items():
        if cfg.get(name):
            raise _config_error(label, name, f"{why}; cannot merge it exactly")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        # PEFT trains the biases of the adapted (``lora_only``) or of all (``all``) layers; a
        # merged LoRA has nowhere to put them, and an adapter file may even lack them
        raise _config_error(label, "bias", f"{bias!r}: the adapter trains the base layers' biases, which a "
                            "merged LoRA has no place for; cannot merge it exactly")
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _config_error(label, "r", f"expected a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _config_error(label, "lora_alpha", f"expected a number, got {alpha!r}")
    out = {"r": r, "lora_alpha": alpha, "use_rslora": bool(cfg.get("use_rslora", False))}
    for name, cast in (("rank_pattern", int), ("alpha_pattern", float)):
        pat = cfg.get(name) or {}
        if not isinstance(pat, dict):
            raise _config_error(label, name, f"expected a mapping, got {type(pat).__name__}")
        for k, v in pat.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (name == "rank_pattern" and (int(v) != v or v <= 0)):
                raise _config_error(label, f"{name}[{k!r}]", f"invalid value {v!r}")
        out[name] = {k: cast(v) for k, v in pat.items()}
    return out


def module_scaling(settings: Mapping, module: str, label: str) -> tuple[int, float, float]:
    """``(r, lora_alpha, scale)`` of ``module`` under the validated config ``settings``."""
    rk = pattern_key(settings["rank_pattern"], module, label=label, field_name="rank_pattern")
    ak = pattern_key(settings["alpha_pattern"], module, label=label, field_name="alpha_pattern")
    r = settings["rank_pattern"][rk] if rk is not None else settings["r"]
    alpha = settings["alpha_pattern"][ak] if ak is not None else settings["lora_alpha"]
    scale = alpha / math.sqrt(r) if settings["use_rslora"] else alpha / r
    return r, alpha, scale


_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", "linear"), ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"), ".lora_embedding_B": ("B", "embedding"),
}


def _classify(key: str) -> tuple[str, str, str] | None:
    """``(module, A|B, kind)`` of a factor key (prefix already stripped), or None."""
    for suffix, (which, kind) in _FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], which, kind
    return None


def _refusal(key: str) -> str:
    if key.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in key:
        return "DoRA magnitude vector: the update is not B @ A; cannot merge it exactly"
    if key.endswith(".lora_A.bias") or key.endswith(".lora_B.bias"):
        return "trained LoRA bias (lora_bias): a merged LoRA has no place for it"
    if key.endswith(".bias"):
        return "trained bias (bias='all' or 'lora_only'): it cannot be merged into LoRA factors"
    if ".modules_to_save." in key:
        return "full trained module copy (modules_to_save): it cannot be merged"
    if "trainable_tokens" in key:
        return "trainable token deltas: not LoRA factors"
    return ("not a LoRA factor (a full weight, as saved for modules_to_save, or an unsupported "
            "PEFT method); cannot merge it exactly")


def read_peft_tensors(store: TensorStore, cfg: Mapping, label: str, config_label: str) -> Adapter:
    """Describe the modules of a PEFT LoRA state dict held by ``store`` under config ``cfg``."""
    settings = check_config(cfg, config_label)
    parts: dict[str, dict] = {}
    passthrough_candidates = []
    for full in store.keys():
        key = full[len(PREFIX):] if full.startswith(PREFIX) else full
        hit = _classify(key)
        if hit is None:
            if key.endswith(".base_layer.weight"):
                passthrough_candidates.append((full, key[: -len(".base_layer.weight")]))
                continue
            raise AdapterError(f"{label}: {full}: {_refusal(key)}")
        module, which, kind = hit
        p = parts.setdefault(module, {"kind": kind})
        if p["kind"] != kind:
            raise AdapterError(f"{label}: {full}: module {module} has both linear and embedding factors")
        p[which] = full
    modules: dict[str, ModuleSpec] = {}
    for module, p in parts.items():
        for which in ("A", "B"):
            if which not in p:
                other = p["B" if which == "A" else "A"]
                raise AdapterError(f"{label}: {other}: lora_{which} for module {module} is missing")
        a_key, b_key = p["A"], p["B"]
        a_shape, b_shape = store.shape(a_key), store.shape(b_key)
        kind = p["kind"]
        if kind == "linear" and len(a_shape) > 2:
            kind = "conv"
        rank, m, n = check_factor_shapes(label, module, kind, a_key, b_key, a_shape, b_shape)
        for key in (a_key, b_key):
            if store.dtype(key) not in FLOAT_DTYPES:
                raise AdapterError(f"{label}: {key}: dtype {store.dtype(key)} is not a float type")
        r_cfg, alpha, scale = module_scaling(settings, module, config_label)
        if r_cfg != rank:
            raise AdapterError(f"{label}: {a_key}: rank {rank} in the weights but the config gives "
                               f"r={r_cfg} for {module} (r / rank_pattern in {config_label})")
        modules[module] = ModuleSpec(
            name=module, kind=kind, a_key=a_key, b_key=b_key, a_shape=a_shape, b_shape=b_shape,
            dtype=torch.promote_types(store.dtype(a_key), store.dtype(b_key)), rank=rank,
            out_features=m, in_features=n, alpha=float(alpha), scale=float(scale))
    passthrough = []
    for full, module in passthrough_candidates:
        # PEFT saves the base weights of a targeted embed_tokens or lm_head with its LoRA
        # (save_embedding_layers="auto"); loading the adapter loads them too, so the merged
        # adapter carries them unchanged
        if module in modules:
            passthrough.append(full)
        else:
            raise AdapterError(f"{label}: {full}: {_refusal(full)}")
    if not modules:
        raise AdapterError(f"{label}: no LoRA factors (no *.lora_A.weight / *.lora_B.weight keys)")
    path = getattr(store, "path", None)
    return Adapter(label=label, format="peft", store=store, modules=modules, config=dict(cfg),
                   passthrough=passthrough, source=None if path is None else path.parent)


def read_peft(path: str | os.PathLike) -> Adapter:
    """Open a PEFT adapter folder (or the ``adapter_model.safetensors`` inside one)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise AdapterError(f"{path}: no such adapter folder")
    cfg, config_label = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        for name in PICKLE_NAMES:
            if (folder / name).is_file():
                raise AdapterError(
                    f"{folder / name}: pickled weights are not read (they can run code when loaded); "
                    f"save the adapter with safetensors (save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"{weights}: missing (a PEFT adapter folder needs {WEIGHTS_NAME})")
    store = SafetensorsStore(weights)
    return read_peft_tensors(store, cfg, str(weights), config_label)


def read_peft_state_dict(state_dict: Mapping[str, torch.Tensor], config, label: str) -> Adapter:
    """A PEFT LoRA state dict (keys as ``get_peft_model_state_dict`` returns them) with its
    config (a dict, or anything with ``to_dict()`` such as ``peft.LoraConfig``)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise AdapterError(f"{label}: config: expected a dict or a peft.LoraConfig, got {type(config).__name__}")
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in dict(config).items()}
    pt = cfg.get("peft_type")
    if pt is not None and not isinstance(pt, str):
        cfg["peft_type"] = getattr(pt, "value", str(pt))
    return read_peft_tensors(DictStore(state_dict, label), cfg, label, f"{label} config")


# ---------------------------------------------------------------------------------------------
# writing


def peft_tensors(modules: list[MergedModule]) -> dict[str, torch.Tensor]:
    """The PEFT state dict of merged modules (``base_model.model.`` keys, as saved by PEFT)."""
    out = {}
    for mm in modules:
        if mm.kind == "embedding":
            out[f"{PREFIX}{mm.name}.lora_embedding_A"] = mm.A
            out[f"{PREFIX}{mm.name}.lora_embedding_B"] = mm.B
        else:
            out[f"{PREFIX}{mm.name}.lora_A.weight"] = mm.A
            out[f"{PREFIX}{mm.name}.lora_B.weight"] = mm.B
    return out


def merged_config(modules: list[MergedModule], rank: int, inputs: list[Adapter], extra: Mapping | None = None
                  ) -> dict:
    """``adapter_config.json`` of a merged adapter: ``r = lora_alpha = rank`` (scaling 1),
    no rsLoRA, the merged modules by full path as ``target_modules`` (so exactly these are
    adapted), and the settings all inputs agree on (``base_model_name_or_path``,
    ``revision``, ``task_type``; null where they differ). A module whose merged rank differs
    from ``rank`` gets a ``rank_pattern``/``alpha_pattern`` entry with the same value."""
    def agreed(key):
        values = {json.dumps(a.config.get(key)) for a in inputs if a.format == "peft"}
        if not values or len(values) != 1 or any(a.format != "peft" for a in inputs):
            return None
        return json.loads(values.pop())

    rank_pattern = {re.escape(m.name): m.rank for m in modules if m.rank != rank}
    cfg = {
        "peft_type": "LORA",
        "task_type": agreed("task_type"),
        "base_model_name_or_path": agreed("base_model_name_or_path"),
        "revision": agreed("revision"),
        "r": int(rank),
        "lora_alpha": int(rank),
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(m.name for m in modules),
        "lora_dropout": 0.0,
        "fan_in_fan_out": any(bool(a.config.get("fan_in_fan_out")) for a in inputs),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if extra:
        cfg.update(extra)
    return cfg


def write_config(folder: str | os.PathLike, config: Mapping) -> None:
    """Write ``adapter_config.json`` into ``folder`` (sorted keys: the same bytes for the same config)."""
    with open(Path(folder) / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
