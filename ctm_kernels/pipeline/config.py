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

import dataclasses
import os
from pathlib import Path

from .. import __version__, options
from ..options import suggest

ADAPTER_KEYS = {"adapter", "model", "parameters", "weight"}


def _unknown(label: str, where: str, key, allowed) -> ValueError:
    return ValueError(f"{label}: {where}{key}: unknown key{suggest(str(key), allowed)}")


def load_config(path: str | os.PathLike) -> dict:
    """The merge settings of a config file, as keyword arguments of :func:`ctm_kernels.merge`
    (plus ``adapters``). A file that is not a merge config raises ``ValueError`` naming the file
    and key; the settings' values are checked where the merge is asked for
    (:meth:`ctm_kernels.options.Options.validate`)."""
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
    top_keys = options.MERGE.schema()["properties"]
    for key in data:
        if key not in top_keys:
            raise _unknown(label, "", key, top_keys)
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
    if "rank" not in data:
        raise ValueError(f"{label}: rank: missing (a positive integer or 'full')")
    out = {"adapters": adapters, "weights": weights, **options.MERGE.from_config(data), "method": method, **params}
    if "output" in data:
        out["output"] = str(path.parent / data["output"]) if not os.path.isabs(str(data["output"])) else data["output"]
    return out


def resolved_config(plan, fmt) -> str:
    """The YAML text of every setting of ``plan`` that decides the output's bytes (what
    :meth:`~ctm_kernels.options.Options.dump` records of its resolved settings, with the output
    format ``fmt``), and the adapters by absolute path, or Hub id at the commit read, with
    their weights."""
    import yaml

    adapters = []
    for ad, src, w in zip(plan.adapters, plan.sources, plan.weights):
        origin = getattr(ad, "origin", None)           # a Hub input: org/name@commit
        adapters.append({"adapter": origin or (str(src.resolve()) if src is not None else ad.label),
                         "parameters": {"weight": float(w)}})
    settings = dataclasses.replace(plan.settings, format=fmt.name, **fmt.settings())
    data = {"ctm_version": __version__, **options.MERGE.dump(settings), "adapters": adapters}
    head = "# the merge that wrote this output: `ctm merge --config THIS_FILE -o OUT` repeats it\n"
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
