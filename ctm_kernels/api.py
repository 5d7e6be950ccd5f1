"""``ctm_kernels.merge``: whole adapters in, one merged adapter out; ``plan_merge``: the dry run.

Both are faces over the pipeline (:mod:`ctm_kernels.pipeline`): :func:`plan_merge` is its plan
stage alone (headers and configs, no factor read); :func:`merge` plans, then streams every
module group through read -> merge -> write once.
"""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .io import Adapter, AdapterError, open_adapter
from .io.peft import CONFIG_NAME, WEIGHTS_NAME
from .io.safetensors_io import SafetensorsStore
from .options import MERGE
from .pipeline.plan import MergePlan, make_plan
from .pipeline.run import execute
from .pipeline.result import MergeResult, MergeStats
from .threads import using_threads

__all__ = ["merge", "plan_merge", "inspect_adapter", "MergeResult", "MergeStats", "MergePlan"]


def plan_merge(adapters: Sequence, **settings) -> MergePlan:
    """What :func:`merge` with the same arguments would do, without reading a factor: modules,
    groups, rank per module, which adapters adapt which modules, estimated memory and time,
    and every problem found (``plan.problems``; :meth:`MergePlan.describe` prints it all)."""
    return make_plan(adapters, strict=False, **settings)


def merge(adapters: Sequence, *, progress: bool | Callable | None = False, prefetch: bool = True,
          distributed: bool | None = None, **settings) -> MergeResult:
    """Merge whole LoRA adapters into one LoRA of rank ``rank`` with Compress-then-Merge.

    ``adapters``: paths (PEFT folders, kohya ``.safetensors``), Hugging Face Hub ids
    (``org/name[@revision]``, from the local cache when there), kohya state dicts, or PEFT
    ``(state_dict, config)`` pairs. A module missing from an adapter gets a zero update from it
    (``mean`` divides by every adapter given). Kohya inputs mixed with PEFT ones are matched to
    the PEFT module paths their names flatten. ``rank``: an integer, capped per module at
    ``min(m, n)`` and at R, the sum of the module's input ranks (the most directions its inputs
    span; ``pad_rank=True`` keeps ``rank`` there, with zero rows), or ``"full"``: ``min(R, m, n)``.
    ``weights``: one per adapter. ``stop``, ``tol``, ``max_iter``: the subspace search's stop
    test (``"energy"``, the default, or ``"subspace"``; docs/DESIGN.md section 8), its tolerance
    (None: 1e-6 and 1e-4) and sweep limit. ``rule_params``: the method's parameters (``top_k`` for
    ties, ``p`` and ``seed`` for dare...; see :data:`ctm_kernels.RULES`). ``dtype``: factor
    dtype for the merge and the output (default: the inputs', promoted). ``progress``: True
    for a tqdm bar over module groups, or a callable ``(done, total, group_description)``.
    ``prefetch``: read the next group on a background thread while merging this one.
    ``threads``: torch's CPU threads for the merge (restored afterwards); None picks
    :func:`ctm_kernels.threads.default_threads` (the cores this process may use, less the busy
    ones). The merged bytes can depend on it, so the output's resolved config records it.

    ``output``: write the merged adapter there as the groups finish, atomically (a PEFT folder;
    a kohya file when ``format="kohya"`` or, with ``format`` None, when the path ends in
    ``.safetensors``); the result's modules then hold no factor data. Without it the merged
    factors are returned in memory. The output is never an input, inside one or holding one;
    ``overwrite`` replaces only a previous ctm output.

    ``distributed``: None uses the ``torch.distributed`` process group when one is
    initialised with more than one rank, False ignores it, True requires it. Every rank must
    call ``merge`` with the same arguments; the module groups are shared out between the
    ranks, rank 0 writes ``output`` (the same bytes as one process with as many threads), and
    every rank returns the full result. The ranks must see one filesystem at ``output``.

    Bad input raises ``ValueError`` naming the file and key, before any factor is read where
    the headers and configs suffice."""
    t0 = time.perf_counter()
    plan = make_plan(adapters, strict=True, **settings)
    with using_threads(plan.settings.threads):
        return execute(plan, progress=progress, prefetch=prefetch, distributed=distributed, started=t0)


_ADAPTERS = [inspect.Parameter("adapters", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Sequence")]
plan_merge.__signature__ = MERGE.signature(_ADAPTERS)
merge.__signature__ = MERGE.signature(_ADAPTERS, [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    for name, default in (("progress", False), ("prefetch", True), ("distributed", None))])


def inspect_adapter(source, *, check_values: bool = True) -> dict:
    """What an adapter holds (from its header and config): format, modules with kind, shape,
    rank, alpha, scale and dtype, and the parameter count. With ``check_values`` the factors
    are read and every one holding NaN or Inf is listed under ``nonfinite``.

    An adapter the merge refuses (DoRA, ``modules_to_save``, trained biases...) is described
    anyway: ``mergeable`` False, ``refused`` the reason (naming the file and key), and its
    tensors by name, shape and dtype."""
    try:
        ad = source if isinstance(source, Adapter) else open_adapter(source)
    except AdapterError as e:
        return _refused(source, e)
    mods = []
    total = 0
    for name, s in ad.modules.items():
        n = (s.rank * s.in_features + s.out_features * s.rank)
        total += n
        mods.append({"name": name, "kind": s.kind, "out": s.out_features, "in": s.in_features,
                     "rank": s.rank, "alpha": s.alpha, "scale": s.scale, "dtype": str(s.dtype).removeprefix("torch."),
                     "params": n})
    rep = {"label": ad.label, "format": ad.format, "mergeable": True, "modules": mods, "parameters": total,
           "passthrough": list(ad.passthrough),
           "base_model_name_or_path": ad.config.get("base_model_name_or_path"),
           "use_rslora": bool(ad.config.get("use_rslora", False))}
    if check_values:
        bad = []
        for s in ad.modules.values():
            for key, t in ad.store.get([s.a_key, s.b_key]).items():
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                if nan or inf:
                    bad.append({"key": key, "nan": nan, "inf": inf})
        rep["nonfinite"] = bad
    return rep


def _refused(source, err: AdapterError) -> dict:
    """The description of an adapter that does not open as a mergeable LoRA: the reason, and
    its tensors when its weights file is readable."""
    path = Path(source)
    folder = path.is_dir()
    weights = path / WEIGHTS_NAME if folder else path
    if not weights.is_file() or weights.suffix != ".safetensors":
        raise err
    try:
        store = SafetensorsStore(weights)
    except AdapterError:
        raise err from None
    config = {}
    if (weights.parent / CONFIG_NAME).is_file():
        try:
            config = json.loads((weights.parent / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            config = {}
    tensors = [{"key": k, "shape": list(store.shape(k)), "dtype": str(store.dtype(k)).removeprefix("torch.")}
               for k in store.keys()]
    # a folder (or its adapter_model.safetensors) is a PEFT adapter, with its config or without it
    peft = bool(config) or folder or weights.name == WEIGHTS_NAME
    fmt = "kohya" if not peft else "peft" if config else f"peft folder without {CONFIG_NAME}"
    return {"label": str(weights), "format": fmt, "mergeable": False,
            "refused": str(err), "tensors": tensors, "peft_type": config.get("peft_type"),
            "base_model_name_or_path": config.get("base_model_name_or_path")}
