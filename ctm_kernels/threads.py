"""How many CPU threads a merge uses: the ``threads`` setting of the API, the PEFT integration
and ``ctm --threads``.

``threads=None`` (the default everywhere) picks :func:`default_threads`: ``OMP_NUM_THREADS`` when
it is set (as torchrun sets it for several ranks), else the cores this process may actually run
on (:func:`available_cpus`: its CPU affinity, capped by a cgroup CPU quota), less one per process
already keeping a core busy (the 1-minute load average, rounded up), at least 1, and under
``torchrun`` divided between the ranks of one machine. Extra threads pay
little on a merge's small products, while oversubscribed ones cost a lot: on this project's
2-core machine two threads took 4x one thread's time beside one busy process, and up to 45x
when it was shared more heavily (docs/THREADS.md).

The merged bytes can depend on the thread count (torch's reductions split by thread), so every
output records the count it ran with (``threads`` in its resolved config) and a re-run of that
config uses it again. This module imports torch only in :func:`using_threads`.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``) of this process, or None when there is none."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    paths = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" or "cpu" in parts[1].split(",")):
            paths.append((parts[1], parts[2]))
    best = None
    for ctrl, rel in paths:
        base = root / "sys/fs/cgroup" if ctrl == "" else root / "sys/fs/cgroup/cpu"
        if ctrl != "" and not base.is_dir():
            base = root / "sys/fs/cgroup/cpu,cpuacct"
        # the process's own group and its parents: the tightest quota applies
        rel_parts = [p for p in rel.split("/") if p]
        for k in range(len(rel_parts), -1, -1):
            d = base.joinpath(*rel_parts[:k])
            q = _read_quota(d, v2=ctrl == "")
            if q is not None:
                best = q if best is None else min(best, q)
    return best


def _read_quota(folder: Path, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: str | os.PathLike = "/") -> int:
    """Cores this process may use: its CPU affinity (``os.sched_getaffinity``), capped by a
    cgroup CPU quota (rounded up), at least 1. ``root``: where ``/proc`` and ``/sys`` are
    (tests give a fake tree)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(Path(root))
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _busy_cores(root: Path) -> int:
    try:
        return math.ceil(float((root / "proc/loadavg").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 0


def default_threads(root: str | os.PathLike = "/") -> int:
    """The thread count a merge takes when none is given (see the module docstring)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    root = Path(root)
    free = available_cpus(root) - _busy_cores(root)
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return max(1, free // max(1, local))


def resolve_threads(threads: int | None) -> int:
    """``threads`` (checked by :mod:`ctm_kernels.options`), or for None :func:`default_threads`."""
    return default_threads() if threads is None else threads


@contextmanager
def using_threads(threads: int):
    """Run the body with torch on ``threads`` intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
