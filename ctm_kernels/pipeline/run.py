"""Running a plan: every group through read -> merge -> write once (see the package docstring)."""
from __future__ import annotations

import os
import resource
import time
from contextlib import ExitStack
from typing import Callable

import torch

from ..io.adapter import MergedModule
from .merge import merge_group
from .plan import MergePlan
from .ranks import Ranks
from .read import GroupReader
from .result import MergeResult, MergeStats
from .write import FileSink, MemorySink


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if os.uname().sysname == "Darwin" else peak * 1024)   # bytes on macOS, KiB elsewhere


def _skeleton(entry, dtype: torch.dtype) -> MergedModule:
    """The merged module ``entry`` will become, with meta tensors: names, shapes, dtypes."""
    s = entry.first
    A = torch.empty((entry.rank, *s.a_shape[1:]), dtype=dtype, device="meta")
    B = torch.empty((s.b_shape[0], entry.rank, *s.b_shape[2:]), dtype=dtype, device="meta")
    return MergedModule(entry.name, s.kind, A, B)


def _run_groups(plan: MergePlan, order: list[int], ranks: Ranks, progress, prefetch: bool,
                emit: Callable[[MergedModule], None]) -> MergeStats:
    """Read, merge and emit this rank's groups (``order``) in order; returns their statistics."""
    stats = MergeStats(world_size=ranks.world)
    bar = None
    if progress is True and ranks.rank == 0:
        from tqdm import tqdm
        desc = "merging" if ranks.world == 1 else f"merging (rank 0 of {ranks.world})"
        bar = tqdm(total=len(order), desc=desc, unit="group", disable=None)
    reader = GroupReader(plan.adapters, plan.groups, order, plan.dtype, ahead=prefetch)
    groups = iter(reader)
    T = len(plan.adapters)
    try:
        for done, loaded in enumerate(groups, 1):
            group = plan.groups[loaded.index]
            spec = group[0].first
            desc = f"{len(group)} x {spec.kind} {spec.out_features}x{spec.in_features}"
            if bar is not None:        # the group being merged now, and what has been read so far
                bar.set_postfix_str(f"{desc}, {T} adapters, read {reader.stats.bytes / 2**20:,.1f} MiB")
            t0 = time.perf_counter()
            merged = merge_group(plan, loaded)
            del loaded                 # its factors go before the next group is read: two groups at most
            t1 = time.perf_counter()
            for mm in merged:
                emit(mm)
            stats.merge_seconds += t1 - t0
            stats.write_seconds += time.perf_counter() - t1
            stats.groups += 1
            stats.modules += len(group)
            del merged
            if bar is not None:
                bar.update(1)
            if callable(progress):
                progress(done, len(order), desc)
    finally:
        groups.close()
        if bar is not None:
            bar.close()
    stats.bytes_read = reader.stats.bytes
    stats.read_seconds = reader.stats.seconds
    stats.load_seconds = reader.load_seconds
    stats.wait_seconds = reader.wait_seconds
    stats.peak_rss_bytes = _peak_rss_bytes()
    return stats


def execute(plan: MergePlan, *, progress=False, prefetch: bool = True, distributed: bool | None = None,
            started: float | None = None) -> MergeResult:
    """Run ``plan`` (which must have no problems): every group read, merged and handed to the
    output once. Returns the :class:`MergeResult`; with ``plan.output`` set the merged factors
    are in the written output and the result holds their shapes only."""
    t0 = time.perf_counter() if started is None else started
    if plan.problems:
        raise ValueError(plan.problems[0])
    ranks = Ranks.detect(distributed)
    order = ranks.share(plan.group_bytes())
    result = MergeResult(modules=[_skeleton(e, plan.dtype) for e in plan.modules], rank=plan.settings.rank,
                         method=plan.settings.method, params=plan.settings.params, adapters=list(plan.names) or [a.label for a in plan.adapters],
                         energy_kept=[], seconds=0.0, plan=plan, output=plan.output,
                         format=None if plan.output is None else plan.output_format.name)

    if plan.output is None:
        sink = MemorySink()
    else:
        out = result.output_spec(plan.output, plan.output_format, plan.settings.overwrite)
        sink = FileSink(out, ranks, result.modules, [e.name for gi in order for e in plan.groups[gi]])
    with ExitStack() as stack:
        sink.open(stack)
        done = ranks.together(lambda: (_run_groups(plan, order, ranks, progress, prefetch, sink.emit), sink.part()))
        by_name = sink.finish(stack, [part for _, part in done])
    result.modules = [by_name[e.name] for e in plan.modules]
    total = MergeStats(world_size=ranks.world)
    for st, _ in done:
        total.add(st)
    total.write_seconds += sink.finish_seconds          # rank 0's copying in of the other ranks' parts
    result.stats = total
    T = len(plan.adapters)
    energy, kept, share = [0.0] * T, [0.0] * T, [0.0] * T          # per adapter, sums over its modules
    for mm in result.modules:
        info = mm.info
        for i, kept_i, share_i, nu in zip(info.adapters, info.energy_kept, info.share_after_rule, info.norms):
            energy[i] += nu * nu
            kept[i] += kept_i * nu * nu
            share[i] += share_i * nu * nu
    result.energy_kept = [kept[i] / energy[i] if energy[i] > 0 else 0.0 for i in range(T)]
    result.share_after_rule = [share[i] / energy[i] if energy[i] > 0 else 0.0 for i in range(T)]
    result.seconds = time.perf_counter() - t0
    return result

