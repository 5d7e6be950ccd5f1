"""``ctm_kernels.merge``: whole adapters in, one merged adapter out.

Adapters are opened lazily (headers and configs first, all validated before any factor is
read), the union of their modules is split into groups of same-shape modules whose factors
fit ``max_group_bytes``, and each group is read, merged by the engine
(:func:`ctm_kernels.merge_layers`, one batched problem per group) and dropped before the next
is read. Peak memory is one group's factors (and the engine's working copies) plus the merged
output (the size of one rank-``rank`` adapter).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .engine import merge_layers
from .io import (Adapter, AdapterError, LazyTensor, MergedModule, kohya_tensors, load_group, merged_config,
                 open_adapter, peft_tensors, plan_groups, plan_modules, write_kohya, write_peft)
from .io.kohya import DEFAULT_PREFIX
from .rules import resolve_params

DEFAULT_GROUP_BYTES = 512 * 2**20
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
FORMATS = ("peft", "kohya")


@dataclass
class MergeResult:
    """A merged adapter: ``modules`` (factors per module), how it was made, and what it kept.

    ``energy_kept[t]`` is the share of adapter t's update (its ``sum ||dW_t||_F^2`` over the
    modules it adapts) that lies in the merged subspaces: per module the engine's
    ``energy_kept``, aggregated weighted by ``||dW_t||_F^2``."""

    modules: list[MergedModule]
    rank: int
    method: str
    params: dict
    adapters: list[str]
    energy_kept: list[float]
    seconds: float
    inputs: list[Adapter] = field(repr=False, default_factory=list)

    def __repr__(self) -> str:
        return (f"MergeResult({len(self.modules)} modules, rank={self.rank}, method={self.method!r}, "
                f"adapters={len(self.adapters)})")

    # -- what PEFT would load -----------------------------------------------------------------

    def config(self) -> dict:
        """The ``adapter_config.json`` of the PEFT output."""
        return merged_config(self.modules, self.rank, self.inputs)

    def _passthrough(self) -> dict[str, LazyTensor]:
        """Full tensors PEFT stores with an embedding LoRA (its base weights); every input that
        carries one must carry the same values, which the output then carries unchanged."""
        holders: dict[str, list[Adapter]] = {}
        for ad in self.inputs:
            for key in ad.passthrough:
                holders.setdefault(key, []).append(ad)
        out = {}
        for key, ads in holders.items():
            def load(key=key, ads=ads):
                ref = ads[0].store.get([key])[key]
                for other in ads[1:]:
                    t = other.store.get([key])[key]
                    if t.shape != ref.shape or not torch.equal(t, ref):
                        raise AdapterError(f"{other.label}: {key}: differs from the same tensor in "
                                           f"{ads[0].label}; the adapters disagree on the base weights")
                return ref
            st = ads[0].store
            out[key] = LazyTensor(st.dtype(key), st.shape(key), load)
        return out

    def state_dict(self, format: str = "peft", *, kohya_prefix: str = DEFAULT_PREFIX) -> dict[str, torch.Tensor]:
        """The merged adapter's tensors as PEFT (``base_model.model.<module>.lora_A.weight``...)
        or kohya (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) keys."""
        if format == "peft":
            out = peft_tensors(self.modules)
            out.update({k: v.load() for k, v in self._passthrough().items()})
            return out
        if format == "kohya":
            self._check_kohya()
            return kohya_tensors(self.modules, kohya_prefix)
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")

    def _check_kohya(self):
        for key in self._passthrough():
            raise ValueError(f"{key}: full base weights (saved by PEFT with an embedding LoRA) have no "
                             "kohya representation; use the PEFT format")

    def metadata(self) -> dict[str, str]:
        return {"ctm_method": self.method, "ctm_rank": str(self.rank),
                "ctm_params": ",".join(f"{k}={v}" for k, v in sorted(self.params.items())),
                "ctm_adapters": str(len(self.adapters))}

    def save(self, path: str | os.PathLike, format: str = "peft", *, overwrite: bool = False,
             kohya_prefix: str = DEFAULT_PREFIX) -> Path:
        """Write a PEFT adapter folder (``format="peft"``) or a kohya ``.safetensors`` file,
        atomically: nothing appears at ``path`` unless the whole output was written."""
        if format == "peft":
            tensors = dict(peft_tensors(self.modules))
            tensors.update(self._passthrough())
            return write_peft(path, tensors, self.config(), overwrite=overwrite, metadata=self.metadata())
        if format == "kohya":
            self._check_kohya()
            meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                    "ss_network_alpha": str(self.rank), **self.metadata()}
            return write_kohya(path, kohya_tensors(self.modules, kohya_prefix), overwrite=overwrite, metadata=meta)
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")

    # -- report ---------------------------------------------------------------------------------

    def summary(self) -> str:
        """A few lines: inputs, modules, rank, time, convergence, per-adapter share kept."""
        its = [mm.info.get("iterations", 0) for mm in self.modules]
        unconverged = sum(1 for mm in self.modules if not mm.info.get("converged", True))
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        lines = [
            f"merged {len(self.adapters)} adapters into {len(self.modules)} modules at rank {self.rank} "
            f"with {self.method}{f' ({params})' if params else ''} in {self.seconds:.2f} s",
            f"subspace iterations per module: mean {sum(its) / max(1, len(its)):.1f}, max {max(its, default=0)}"
            + (f"; {unconverged} modules stopped at max_iter before reaching tol" if unconverged else ""),
            "share of each adapter's update kept in the merged subspace:",
        ]
        width = max(len(a) for a in self.adapters)
        for label, kept in zip(self.adapters, self.energy_kept):
            lines.append(f"  {label:<{width}}  {100 * kept:6.2f} %")
        return "\n".join(lines)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank


def _check_weights(weights, T: int) -> list[float]:
    if weights is None:
        return [1.0] * T
    vals = [float(w) for w in (weights.tolist() if torch.is_tensor(weights) else weights)]
    if len(vals) != T:
        raise ValueError(f"{len(vals)} weights for {T} adapters")
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"weights must be finite, got {v}")
    return vals


def _resolve_dtype(dtype, adapters: list[Adapter]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        out = None
        for ad in adapters:
            for s in ad.modules.values():
                out = s.dtype if out is None else torch.promote_types(out, s.dtype)
        return out
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in set(DTYPES.values()):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _check_device(device):
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def open_adapters(adapters: Sequence) -> list[Adapter]:
    """Open every adapter (headers and configs only)."""
    if isinstance(adapters, (str, os.PathLike, dict, tuple)) or not isinstance(adapters, Sequence):
        raise ValueError("adapters must be a list of paths, state dicts or (state_dict, config) pairs")
    if not adapters:
        raise ValueError("no adapters to merge")
    opened = [a if isinstance(a, Adapter) else open_adapter(a, label=f"adapter[{i}]")
              for i, a in enumerate(adapters)]
    return opened


def _merge_group(adapters: list[Adapter], group, first: int, dtype, weights: list[float], *, rank, method,
                 params, **engine_kw) -> list[MergedModule]:
    """Read one group's factors, merge them as one engine call, return the merged modules
    (CPU, stored layout). ``first`` is the group's position among all modules."""
    factors = load_group(adapters, group, dtype)
    layers = [([a for _, a, _, _ in mod], [b for _, _, b, _ in mod], [s for *_, s in mod]) for mod in factors]
    layer_w = [[weights[i] for i, *_ in mod] for mod in factors]
    # each module is identified by its position among all modules, so that its DARE mask is
    # the same whatever the group sizes (max_group_bytes)
    out = merge_layers(layers, rank=rank, method=method, weights=layer_w, layer_ids=range(first, first + len(layers)),
                       **engine_kw, **params)
    del factors, layers
    merged = []
    for e, res in zip(group, out):
        spec = e.first
        A, B = res.A.detach().to("cpu"), res.B.detach().to("cpu")
        if spec.kind == "conv":
            A = A.reshape(A.shape[0], *spec.a_shape[1:])
            B = B.reshape(B.shape[0], B.shape[1], *spec.b_shape[2:])
        info = res.info
        merged.append(MergedModule(e.name, spec.kind, A, B, {
            "iterations": info.iterations, "converged": info.converged, "energy_kept": list(info.energy_kept),
            "norms": list(info.norms), "adapters": [i for i, _ in e.specs]}))
    return merged


def merge(adapters: Sequence, *, rank: int, method: str = "ties", weights=None, beta: float = 0.0,
          scale: float = 1.0, tol: float = 1e-4, max_iter: int = 1000, device=None, dtype=None,
          max_group_bytes: int = DEFAULT_GROUP_BYTES, progress: bool | Callable | None = False,
          **rule_params) -> MergeResult:
    """Merge whole LoRA adapters into one rank-``rank`` LoRA with Compress-then-Merge.

    ``adapters``: paths (PEFT folders, kohya ``.safetensors``), kohya state dicts, or PEFT
    ``(state_dict, config)`` pairs. A module missing from an adapter gets nothing from it.
    ``weights``: one per adapter. ``rule_params``: the method's parameters (``top_k`` for
    ties, ``p`` and ``seed`` for dare...; see :data:`ctm_kernels.RULES`). ``dtype``: factor
    dtype for the merge and the output (default: the inputs', promoted). ``progress``: True
    for a tqdm bar over module groups, or a callable ``(done, total, group_description)``.

    Bad input raises ``ValueError`` naming the file and key, before any factor is read where
    the headers and configs suffice."""
    t0 = time.perf_counter()
    params = resolve_params(method, rule_params)
    rank = _check_rank(rank)
    opened = open_adapters(adapters)
    w = _check_weights(weights, len(opened))
    entries = plan_modules(opened)
    for e in entries:
        s = e.first
        if rank > min(s.out_features, s.in_features):
            i, spec = e.specs[0]
            raise ValueError(f"{opened[i].label}: {spec.a_key}: rank {rank} exceeds min(m, n) = "
                             f"{min(s.out_features, s.in_features)} of module {e.name} "
                             f"({s.out_features}x{s.in_features})")
    cdtype = _resolve_dtype(dtype, opened)
    if isinstance(max_group_bytes, bool) or not isinstance(max_group_bytes, int) or max_group_bytes < 1:
        raise ValueError(f"max_group_bytes must be a positive integer, got {max_group_bytes!r}")
    device = _check_device(device)
    groups = plan_groups(entries, max_group_bytes)

    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=len(groups), desc="merging", unit="group", disable=None)
    merged: list[MergedModule] = []
    first = 0                      # position of the group's first module in the order of the groups
    try:
        for done, group in enumerate(groups, 1):
            spec = group[0].first
            desc = f"{len(group)} x {spec.kind} {spec.out_features}x{spec.in_features}"
            if bar is not None:
                bar.set_postfix_str(desc)              # the group being merged now
            merged += _merge_group(opened, group, first, cdtype, w, rank=rank, method=method, params=params,
                                   beta=beta, scale=scale, tol=tol, max_iter=max_iter, device=device)
            first += len(group)
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, len(groups), desc)
    finally:
        if bar is not None:
            bar.close()
    kept_num = [0.0] * len(opened)
    kept_den = [0.0] * len(opened)
    for mm in merged:
        for i, kept, nu in zip(mm.info["adapters"], mm.info["energy_kept"], mm.info["norms"]):
            kept_num[i] += kept * nu * nu
            kept_den[i] += nu * nu
    order = {e.name: k for k, e in enumerate(entries)}
    merged.sort(key=lambda mm: order[mm.name])
    energy = [kept_num[i] / kept_den[i] if kept_den[i] > 0 else 0.0 for i in range(len(opened))]
    return MergeResult(modules=merged, rank=rank, method=method, params=params,
                       adapters=[a.label for a in opened], energy_kept=energy,
                       seconds=time.perf_counter() - t0, inputs=opened)


def inspect_adapter(source) -> dict:
    """What an adapter holds (from its header and config): format, modules with kind, shape,
    rank, alpha, scale and dtype, and the parameter count."""
    ad = source if isinstance(source, Adapter) else open_adapter(source)
    mods = []
    total = 0
    for name, s in ad.modules.items():
        n = (s.rank * s.in_features + s.out_features * s.rank)
        total += n
        mods.append({"name": name, "kind": s.kind, "out": s.out_features, "in": s.in_features,
                     "rank": s.rank, "alpha": s.alpha, "scale": s.scale, "dtype": str(s.dtype).removeprefix("torch."),
                     "params": n})
    return {"label": ad.label, "format": ad.format, "modules": mods, "parameters": total,
            "passthrough": list(ad.passthrough),
            "base_model_name_or_path": ad.config.get("base_model_name_or_path"),
            "use_rslora": bool(ad.config.get("use_rslora", False))}
