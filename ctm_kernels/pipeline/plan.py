"""Stage 1, plan: open the adapters (headers and configs only), validate everything, choose
a rank per module, and cut the modules into memory-bounded groups of one shape.

Nothing here reads a factor, so a plan is cheap (a quarter of a second for 16 adapters of the
Llama-3-8B layout, torch already imported) and is itself the dry run: :meth:`MergePlan.describe` prints what the
merge will do and every problem found. With ``strict=False`` problems are collected rather
than raised, so that a dry run lists them all.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Sequence

import torch

from .. import options
from ..engine import DEFAULT_TOL
from ..io import Adapter, AdapterError, ModuleSpec, open_adapter
from ..io.destination import check_output
from ..io.formats import OutputFormat, output_format
from ..io.kohya import match_kohya_names
from ..options import FULL_RANK, Settings
from ..rules import resolve_params
from ..threads import resolve_threads
from .launch import check_device

# the dtypes of options.DTYPE_NAMES
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}

# Rough time model for the dry run, calibrated on one measured whole-model merge (README:
# 16 rank-16 bf16 adapters over the Llama-3-8B layout, so R = 256, TIES, 49 s on this
# project's 2-core CPU): time proportional to the sum over modules of (m + n) R^2 (Grams and
# lift) plus _SWEEP_COST_R3 * R^3 (the subspace sweeps, about 7 of them there).
_SWEEP_COST_R3 = 20
_REF_SECONDS = 49.0
_LLAMA3_8B_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                    (4096, 14336)]


def _module_work(m: int, n: int, R: int) -> int:
    return (m + n) * R**2 + _SWEEP_COST_R3 * R**3


_REF_WORK = 32 * sum(_module_work(m, n, 256) for m, n in _LLAMA3_8B_LAYER)


@dataclass
class ModuleEntry:
    """One module of the merge: which adapters adapt it (indices into the adapter list) and
    the rank of its merged LoRA."""

    name: str
    specs: list[tuple[int, ModuleSpec]]
    rank: int = 0

    @property
    def first(self) -> ModuleSpec:
        return self.specs[0][1]

    @property
    def stacked_rank(self) -> int:
        """R: the sum of the contributing adapters' ranks."""
        return sum(s.rank for _, s in self.specs)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self.specs)


@dataclass
class MergePlan:
    """Everything a merge needs before it reads a factor.

    ``settings``: the merge's settings, resolved (rule parameters with their defaults, the
    tolerance of the stop test, the thread count, the dtype and format chosen); ``dtype``,
    ``device`` and ``output_format`` (the format's object) as the merge uses them.

    ``modules`` in output order, each with its merged rank; ``groups`` lists of modules (same
    kind, shape and merged rank; at most ``max_group_bytes`` of input factors each) in the
    order they are merged; ``firsts[g]`` the position of group ``g``'s first module in that
    order (seeded rules identify a module by it). ``problems``: what stops the merge (empty
    when the plan is good); ``notes``: what the user may want to know."""

    adapters: list[Adapter]
    weights: list[float]
    settings: Settings
    dtype: torch.dtype | None
    device: torch.device | None
    output_format: OutputFormat
    output: Path | None
    modules: list[ModuleEntry] = field(default_factory=list)
    groups: list[list[ModuleEntry]] = field(default_factory=list)
    firsts: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def out_rank(self) -> int:
        """``r`` of the output config: the requested rank when every module has it, else (rank
        ``"full"``, or ranks capped per module) the most common merged rank (other modules get
        ``rank_pattern`` entries)."""
        rank = self.settings.rank
        if isinstance(rank, int) and all(e.rank == rank for e in self.modules):
            return rank
        counts = Counter(e.rank for e in self.modules)
        return max(counts, key=lambda r: (counts[r], r)) if counts else 0

    def group_bytes(self) -> list[int]:
        return [sum(e.nbytes for e in g) for g in self.groups]

    def estimated_peak_bytes(self) -> int:
        """Factor memory at the merge's peak: the group being merged and the one read ahead as
        stored, the engine's stacked copy in the merge dtype and its float64 working copies (the
        7x of a bf16 group that sets :data:`ctm_kernels.options.DEFAULT_GROUP_BYTES`)."""
        peak = 0
        for g in self.groups:
            stored = sum(e.nbytes for e in g)
            elems = sum(prod(s.a_shape) + prod(s.b_shape) for e in g for _, s in e.specs)
            itemsize = (self.dtype or torch.float32).itemsize
            peak = max(peak, 2 * stored + elems * itemsize + elems * 8)
        return peak

    def estimated_seconds(self) -> float:
        """A rough single-process CPU time (see ``_REF_WORK``): the sweeps of a flat-spectrum set
        can take several times longer, a GPU much less."""
        work = sum(_module_work(e.first.out_features, e.first.in_features, e.stacked_rank) for e in self.modules)
        return _REF_SECONDS * work / _REF_WORK

    def to_dict(self) -> dict:
        """The plan as plain data (``ctm plan --json``)."""
        s = self.settings
        return {
            "adapters": [{"label": n, "format": a.format, "weight": w, "modules": len(a.modules)}
                         for n, a, w in zip(self.names, self.adapters, self.weights)],
            "rank": s.rank, "pad_rank": s.pad_rank, "threads": s.threads, "method": s.method, "params": dict(s.params),
            "format": self.output_format.name,
            "output": None if self.output is None else str(self.output),
            "modules": [{"name": e.name, "kind": e.first.kind, "out": e.first.out_features,
                         "in": e.first.in_features, "rank": e.rank, "stacked_rank": e.stacked_rank,
                         "adapters": [i for i, _ in e.specs]} for e in self.modules],
            "groups": [[e.name for e in g] for g in self.groups],
            "shared_modules": sum(1 for e in self.modules if len(e.specs) > 1),
            "estimated_peak_factor_bytes": self.estimated_peak_bytes(),
            "estimated_seconds": self.estimated_seconds(),
            "problems": list(self.problems), "notes": list(self.notes),
        }

    def describe(self) -> str:
        """What the merge will do, for people (``ctm plan``)."""
        T = len(self.adapters)
        s = self.settings
        params = ", ".join(f"{k}={v}" for k, v in sorted(s.params.items()))
        lines = [f"merge {T} adapter{'s' if T != 1 else ''} with {s.method}"
                 f"{f' ({params})' if params else ''} at rank {s.rank}"
                 + (f" into {self.output} ({self.output_format.name})" if self.output is not None else "")
                 + f", {s.threads} CPU thread{'s' if s.threads != 1 else ''}"]
        width = max((len(n) for n in self.names), default=0)
        for i, (name, ad, w) in enumerate(zip(self.names, self.adapters, self.weights)):
            shared = sum(1 for e in self.modules if len(e.specs) > 1 and any(j == i for j, _ in e.specs))
            lines.append(f"  [{i}] {name:<{width}}  {ad.format}, weight {w:g}, {len(ad.modules)} modules "
                         f"({shared} shared with another adapter)")
        if self.modules:
            shared = sum(1 for e in self.modules if len(e.specs) > 1)
            lines.append(f"{len(self.modules)} modules ({shared} adapted by more than one adapter) in "
                         f"{len(self.groups)} groups:")
            for g, b in zip(self.groups, self.group_bytes()):
                s = g[0].first
                lines.append(f"  {len(g):>4} x {s.kind} {s.out_features}x{s.in_features} at rank {g[0].rank}, "
                             f"{_size(b)} of factors")
            lines.append("modules (rank, adapters):")
            for e in self.modules:
                lines.append(f"  {e.name}  rank {e.rank}, adapters {','.join(str(i) for i, _ in e.specs)}")
            lines.append(f"estimated peak factor memory {_size(self.estimated_peak_bytes())}, "
                         f"rough time {self.estimated_seconds():.1f} s on one 2-core CPU process")
        for n in self.notes:
            lines.append(f"note: {n}")
        for p in self.problems:
            lines.append(f"problem: {p}")
        if not self.problems:
            lines.append("no problems found")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


class _Problems:
    """Raise at once (a merge) or collect (a dry run)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.found: list[str] = []

    def __call__(self, message: str, cls=ValueError) -> None:
        if self.strict:
            raise cls(message)
        self.found.append(message)


def check_weights(weights: list[float] | None, T: int) -> list[float]:
    """One weight per adapter (all 1 when none are given)."""
    if weights is None:
        return [1.0] * T
    if len(weights) != T:
        raise ValueError(f"{len(weights)} weight{'s' if len(weights) != 1 else ''} for {T} adapter{'s' if T != 1 else ''}")
    return weights


def resolve_dtype(name: str | None, adapters: list[Adapter]) -> torch.dtype | None:
    """The dtype named, or (None) the inputs' dtypes promoted."""
    if name is not None:
        return DTYPES[name]
    out = None
    for ad in adapters:
        for s in ad.modules.values():
            out = s.dtype if out is None else torch.promote_types(out, s.dtype)
    return out


def open_adapters(adapters: Sequence, problem: _Problems | None = None) -> tuple[list[Adapter], list, list[int]]:
    """Open every adapter (headers and configs only). Returns the adapters that opened, where
    each came from (a path, or None for one in memory) and their positions in ``adapters``."""
    if isinstance(adapters, (str, os.PathLike, dict, tuple)) or not isinstance(adapters, Sequence):
        raise ValueError("adapters must be a list of paths, state dicts or (state_dict, config) pairs")
    if not adapters:
        raise ValueError("no adapters to merge")
    problem = problem or _Problems(True)
    opened, sources, kept = [], [], []
    for i, a in enumerate(adapters):
        try:
            ad = a if isinstance(a, Adapter) else open_adapter(a, label=f"adapter[{i}]")
        except AdapterError as e:
            problem(str(e), AdapterError)
            continue
        opened.append(ad)
        sources.append(ad.source)
        kept.append(i)
    return opened, sources, kept


def _name(source, ad: Adapter) -> str:
    """An adapter as the user named it: the path or Hub id given (not the weights file inside a
    folder), or the adapter's own label for one in memory."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return ad.label


def plan_modules(adapters: list[Adapter], problem: _Problems | None = None) -> list[ModuleEntry]:
    """The union of the adapters' modules, in natural order (``layers.2`` before ``layers.10``);
    a module missing from an adapter has no entry for it (the adapter's update there is zero).
    Adapters that disagree on a module's shape are a problem."""
    problem = problem or _Problems(True)
    entries: dict[str, ModuleEntry] = {}
    for i, ad in enumerate(adapters):
        for name, spec in ad.modules.items():
            e = entries.get(name)
            if e is None:
                entries[name] = ModuleEntry(name, [(i, spec)])
                continue
            j, ref = e.specs[0]
            if _describe(spec) != _describe(ref):
                problem(f"{ad.label}: {spec.a_key}: module {name} is {_describe(spec)} here but "
                        f"{_describe(ref)} in {adapters[j].label} ({ref.a_key}); adapters of one base "
                        "model must agree", AdapterError)
                continue
            e.specs.append((i, spec))
    return [entries[k] for k in sorted(entries, key=_natural_key)]


def _natural_key(name: str):
    parts = name.replace("_", ".").split(".")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def _describe(spec: ModuleSpec) -> str:
    """Kind and update shape ``[out, in(, *kernel)]`` of a module, for comparisons and messages."""
    return f"{spec.kind} [{', '.join(map(str, (spec.out_features, *spec.a_shape[1:])))}]"


def choose_ranks(entries: list[ModuleEntry], rank: int | str, pad: bool = False) -> list[str]:
    """Set each module's merged rank: ``rank`` capped at ``min(m, n)`` (a rank-``min(m, n)``
    LoRA already holds any update) and at R, the sum of its adapters' ranks (the most directions
    its inputs span: more would be rows of zeros), or with ``rank="full"`` ``min(R, m, n)``:
    every direction the inputs have, so ``sum`` is exact. ``pad``: keep ``rank`` above R (the
    extra rows are zeros; every module then has the rank asked for, up to ``min(m, n)``).
    Returns notes on the capped modules."""
    capped: dict[tuple, int] = {}
    spanned: dict[tuple, int] = {}
    for e in entries:
        s = e.first
        cap = min(s.out_features, s.in_features)
        if rank == FULL_RANK:
            e.rank = min(e.stacked_rank, cap)
            continue
        e.rank = min(rank, cap)
        if rank > cap:
            key = (s.kind, s.out_features, s.in_features)
            capped[key] = capped.get(key, 0) + 1
        if not pad and e.stacked_rank < e.rank:
            e.rank = e.stacked_rank
            spanned[e.rank] = spanned.get(e.rank, 0) + 1
    notes = [f"rank {rank} capped at min(m, n) = {min(m, n)} on {k} {kind} module{'s' if k != 1 else ''} "
             f"of shape {m}x{n}" for (kind, m, n), k in capped.items()]
    notes += [f"rank {rank} capped at {r}, the sum of the input ranks (the most directions the inputs span), on "
              f"{k} module{'s' if k != 1 else ''}; pad_rank (--pad-rank) keeps rank {rank} with zero rows"
              for r, k in sorted(spanned.items())]
    return notes


def plan_groups(entries: list[ModuleEntry], max_bytes: int) -> list[list[ModuleEntry]]:
    """Split the modules into groups of the same shape and merged rank whose factors (all
    adapters) take at most ``max_bytes`` (a single module larger than that is a group of its own).

    Each shape's modules are cut, in order, into as few groups as the budget allows, and those
    groups are made as even as possible: 600 MB of one shape under a 256 MB budget becomes
    three groups of about 200 MB, not 256 + 256 + 88, so the largest group (what sets the peak
    memory) is as small as the group count allows."""
    by_shape: dict[tuple, list[ModuleEntry]] = {}
    for e in entries:
        by_shape.setdefault((e.first.shape_key, e.rank), []).append(e)
    groups = []
    for members in by_shape.values():
        sizes = [e.nbytes for e in members]
        count = len(_fill(sizes, max_bytes))
        # the smallest cap that still gives ``count`` groups (filling greedily up to a cap
        # gives the fewest groups for that cap)
        lo, hi = max(sizes), max(max_bytes, max(sizes))
        while lo < hi:
            mid = (lo + hi) // 2
            if len(_fill(sizes, mid)) <= count:
                hi = mid
            else:
                lo = mid + 1
        groups += [[members[i] for i in idx] for idx in _fill(sizes, lo)]
    return groups


def _fill(sizes: list[int], cap: int) -> list[list[int]]:
    """Consecutive indices into groups, each group filled up to ``cap`` (a larger item alone)."""
    out, cur, total = [], [], 0
    for i, b in enumerate(sizes):
        if cur and total + b > cap:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += b
    out.append(cur)
    return out


def make_plan(adapters: Sequence, *, strict: bool = True, **given) -> MergePlan:
    """Plan a merge of ``adapters`` with the settings ``given`` (the keyword arguments of
    :func:`ctm_kernels.merge`, validated here). With ``strict`` the first problem raises
    ``ValueError`` naming the file and key; otherwise every problem found is in ``plan.problems``."""
    problem = _Problems(strict)
    bad = set()

    def bad_setting(e):
        bad.add(e.name)
        problem(str(e))

    def checked(fn, *args, default=None):
        try:
            return fn(*args)
        except ValueError as e:
            problem(str(e))
            return default

    s = options.MERGE.validate(given, None if strict else bad_setting)
    params = {} if "method" in bad else checked(resolve_params, s.method, s.params, default={})
    rank = 1 if s.rank is None else s.rank
    fmt = checked(output_format, s.output, s.format, s.kohya_prefix, default=output_format(None))
    opened, sources, kept = open_adapters(adapters, problem)
    w = checked(check_weights, s.weights, len(adapters), default=[1.0] * len(adapters))
    w = [w[i] for i in kept]                  # the weights of the adapters that opened
    opened = match_kohya_names(opened, problem)
    entries = plan_modules(opened, problem)
    if len(opened) > 1 and entries and not any(len(e.specs) > 1 for e in entries):
        problem(f"no module is adapted by more than one of the {len(opened)} adapters (first modules: "
                f"{', '.join(a.label + ': ' + next(iter(a.modules)) for a in opened[:2])}); adapters of "
                "different base models, or module names that do not match, cannot be merged", AdapterError)
    notes = choose_ranks(entries, rank, s.pad_rank)
    if s.method == "iso_cts":
        for e in entries:
            if len(e.specs) >= e.rank:
                problem(f"{e.name}: iso_cts needs fewer adapters at a module than its merged rank; "
                        f"{len(e.specs)} of the {len(opened)} adapters adapt it at rank {e.rank} (adapters "
                        f"{','.join(str(i) for i, _ in e.specs)}): give a higher rank or another method")
                break
    cdtype = resolve_dtype(s.dtype, opened)
    dev = checked(check_device, s.device)
    output = None if s.output is None else Path(s.output)
    fmt.check_plan(entries, opened, output is not None, problem)
    if output is not None:
        checked(check_output, output, fmt, [src for src in sources if src is not None], s.overwrite)
    settings = replace(s, rank=rank, params=params, format=fmt.name, threads=resolve_threads(s.threads),
                       dtype=None if cdtype is None else str(cdtype).removeprefix("torch."),
                       tol=DEFAULT_TOL[s.stop] if s.tol is None else s.tol)     # resolved: they decide the bytes
    plan = MergePlan(adapters=opened, weights=w, settings=settings, dtype=cdtype, device=dev,
                     output_format=fmt,
                     output=output, modules=entries, problems=problem.found, notes=notes, sources=sources,
                     names=[_name(adapters[i], ad) for i, ad in zip(kept, opened)])
    plan.groups = plan_groups(entries, s.max_group_bytes) if entries else []
    k = 0
    for g in plan.groups:
        plan.firsts.append(k)
        k += len(g)
    return plan
