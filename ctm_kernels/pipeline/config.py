"""Merge config files (YAML, after mergekit's convention) and the resolved config of an output.

A config names the adapters with their weights, the method and its parameters, the rank and
the output; ``ctm merge --config merge.yaml`` runs it, and every output carries the resolved
config (every setting that decides its bytes, adapter paths absolute) as ``ctm_merge.yaml``
in a PEFT folder or as the ``ctm_config`` metadata of a kohya file, so one file reproduces a
merge::

    merge_method: ties            # or: method
    rank: 16                      # or "full"
    parameters: {top_k: 0.2}      # the method's parameters; mergekit's density is accepted
    adapters:                     # or: models
      - adapter: adapters/math    # or: model; paths relative to this file, or a Hub id
        parameters: {weight: 1.0}
      - adapter: adapters/code
        weight: 0.5
    output: merged

A config in mergekit's vocabulary means what it means in mergekit: ``density`` (the share of
entries kept) is ``top_k`` for ``ties`` and ``1 - p`` for ``dare``; for ``dare_ties`` it is
``p = 1 - density`` with no magnitude trim (``top_k: 1``) and the agreeing entries summed, not
averaged (``normalize: false``, mergekit's default for that method), unless the file sets
``top_k`` or ``normalize`` itself. The rules take one value of each parameter for all
adapters, so a per-adapter rule parameter must be the same for every adapter. The resolved
config of an output lists every parameter that ran, so it shows what ``density`` became.

``threads`` (CPU threads; the merged bytes can depend on them) and ``pad_rank`` are recorded in
every resolved config and honoured when it is run again; a Hub input is recorded as
``org/name@commit``, the snapshot that was read, so that the file runs on another machine.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from .. import __version__

TOP_KEYS = {"adapters", "models", "merge_method", "method", "rank", "parameters", "beta", "scale", "stop", "tol",
            "max_iter", "dtype", "output", "format", "kohya_prefix", "max_group_mb", "device", "base_model",
            "ctm_version", "threads", "pad_rank"}
ADAPTER_KEYS = {"adapter", "model", "parameters", "weight"}


def suggest(word: str, choices) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown(label: str, where: str, key, allowed) -> ValueError:
    return ValueError(f"{label}: {where}{key}: unknown key{suggest(str(key), allowed)}")


def load_config(path: str | os.PathLike) -> dict:
    """The merge settings of a config file, as keyword arguments of :func:`ctm_kernels.merge`
    (plus ``adapters`` and ``output``). Bad files raise ``ValueError`` naming the file and key."""
    import yaml

    path = Path(path)
    label = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{label}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{label}: not a readable YAML file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected a mapping of settings")
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(label, "", key, TOP_KEYS)
    for a, b in (("adapters", "models"), ("merge_method", "method")):
        if a in data and b in data:
            raise ValueError(f"{label}: {b}: given together with {a}; use one")
    items = data.get("adapters", data.get("models"))
    if not isinstance(items, list) or not items:
        raise ValueError(f"{label}: adapters: expected a list of adapters")
    method = data.get("merge_method", data.get("method", "ties"))
    if not isinstance(method, str):
        raise ValueError(f"{label}: merge_method: expected a name, got {method!r}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{label}: parameters: expected a mapping")
    params = dict(params)
    adapters, weights, per_adapter = [], [], {}
    for i, item in enumerate(items):
        where = f"adapters[{i}]"
        if isinstance(item, str):
            item = {"adapter": item}
        if not isinstance(item, dict):
            raise ValueError(f"{label}: {where}: expected a path or a mapping with 'adapter'")
        for key in item:
            if key not in ADAPTER_KEYS:
                raise _unknown(label, f"{where}.", key, ADAPTER_KEYS)
        src = item.get("adapter", item.get("model"))
        if not isinstance(src, str) or not src:
            raise ValueError(f"{label}: {where}.adapter: expected a path or a Hub id")
        local = path.parent / src
        adapters.append(str(local) if not os.path.isabs(src) and local.exists() else src)
        ap = dict(item.get("parameters") or {})
        w = ap.pop("weight", item.get("weight", 1.0))
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"{label}: {where}.weight: expected a number, got {w!r}")
        weights.append(float(w))
        for k, v in ap.items():
            per_adapter.setdefault(k, []).append((where, v))
    for k, vals in per_adapter.items():
        if len(vals) != len(items) or len({repr(v) for _, v in vals}) != 1:
            raise ValueError(f"{label}: {vals[0][0]}.parameters.{k}: the merge rules take one {k} for all "
                             "adapters; give it under the top-level parameters (or the same value for every adapter)")
        if k in params and repr(params[k]) != repr(vals[0][1]):
            raise ValueError(f"{label}: {vals[0][0]}.parameters.{k}: differs from the top-level parameters.{k}")
        params[k] = vals[0][1]
    if "density" in params:
        d = params.pop("density")
        if method == "ties":
            params.setdefault("top_k", d)
        elif method in ("dare", "dare_ties") and isinstance(d, (int, float)) and not isinstance(d, bool):
            params.setdefault("p", float(f"{1.0 - d:.12g}"))     # 1 - 0.7 is 0.30000000000000004
            if method == "dare_ties":                            # mergekit: no trim, agreeing entries summed
                params.setdefault("top_k", 1.0)
                params.setdefault("normalize", False)
        else:
            raise ValueError(f"{label}: parameters.density: means nothing to {method!r} (ties: top_k; dare, "
                             "dare_ties: 1 - p)")
    out = {"adapters": adapters, "weights": weights, "method": method, **params}
    if "rank" not in data:
        raise ValueError(f"{label}: rank: missing (a positive integer or 'full')")
    for key in ("rank", "beta", "scale", "stop", "tol", "max_iter", "dtype", "format", "kohya_prefix", "device",
                "threads", "pad_rank"):
        if key in data:
            out[key] = data[key]
    if "threads" in out and out["threads"] is not None and (isinstance(out["threads"], bool)
                                                            or not isinstance(out["threads"], int) or out["threads"] < 1):
        raise ValueError(f"{label}: threads: expected a positive integer, got {out['threads']!r}")
    if "pad_rank" in out and not isinstance(out["pad_rank"], bool):
        raise ValueError(f"{label}: pad_rank: expected true or false, got {out['pad_rank']!r}")
    if "max_group_mb" in data:
        out["max_group_bytes"] = int(data["max_group_mb"]) * 2**20
    if "output" in data:
        out["output"] = str(path.parent / data["output"]) if not os.path.isabs(str(data["output"])) else data["output"]
    return out


def resolved_config(plan, fmt) -> str:
    """The YAML text of every setting of ``plan`` that decides the output's bytes (adapters by
    absolute path or Hub id at the commit read, weights, method and parameters, rank, solver
    settings, dtype, the output format ``fmt`` and its settings, CPU threads)."""
    import yaml

    adapters = []
    for ad, src, w in zip(plan.adapters, plan.sources, plan.weights):
        origin = getattr(ad, "origin", None)           # a Hub input: org/name@commit
        adapters.append({"adapter": origin or (str(src.resolve()) if src is not None else ad.label),
                         "parameters": {"weight": float(w)}})
    data = {"ctm_version": __version__, "merge_method": plan.method, "rank": plan.rank,
            "parameters": {k: v for k, v in sorted(plan.params.items())},
            **{k: plan.engine[k] for k in ("beta", "scale", "stop", "tol", "max_iter")},
            "dtype": None if plan.dtype is None else str(plan.dtype).removeprefix("torch."),
            "format": fmt.name, "threads": plan.threads}
    if plan.pad_rank:
        data["pad_rank"] = True
    data.update(fmt.settings())
    data["adapters"] = adapters
    head = "# the merge that wrote this output: `ctm merge --config THIS_FILE -o OUT` repeats it\n"
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
