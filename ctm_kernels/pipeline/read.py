"""Stage 2, read: the factors of one module group at a time, the next group read ahead.

A background thread reads the group after the one being merged and never more than one
ahead, so the factors in memory are at most two groups' (the caller drops each group before
asking for the next). The reads release the GIL (positioned file reads, torch conversions),
so they overlap the merge's compute.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..io.adapter import Adapter, ReadStats
from .plan import ModuleEntry


@dataclass
class AdapterFactors:
    """One adapter's factors at one module: ``A [r, n]``, ``B [m, r]`` (checked finite, in the
    merge dtype) and its LoRA ``scale``; ``adapter`` its index in the plan's adapters."""

    adapter: int
    A: torch.Tensor
    B: torch.Tensor
    scale: float


# per module of a group, the factors of the adapters that adapt it
Factors = list[list[AdapterFactors]]


@dataclass(frozen=True)
class LoadedGroup:
    """One module group's factors as the reader hands them to the merge: ``index``, the group's
    index in the plan's groups; ``factors``, per module of the group (in the plan's order) the
    factors of the adapters that adapt it."""

    index: int
    factors: Factors


def load_group(adapters: list[Adapter], group: list[ModuleEntry], dtype: torch.dtype | None,
               stats: ReadStats | None = None) -> Factors:
    """Factors of one group: per module, those of the adapters that adapt it, checked finite
    and in ``dtype``. Each adapter's file is opened once for the whole group."""
    wanted: dict[int, list[str]] = {}
    for e in group:
        for i, s in e.specs:
            wanted.setdefault(i, []).append(e.name)
    loaded = {i: adapters[i].load(names, dtype, stats) for i, names in wanted.items()}
    return [[AdapterFactors(i, *loaded[i][e.name], s.scale) for i, s in e.specs] for e in group]


_END = object()


class GroupReader:
    """Iterate the :class:`LoadedGroup` of each group in ``order`` (group indices). The caller
    drops each one before asking for the next.

    ``load_seconds`` sums the time of the loads (reads, finiteness checks, conversions);
    ``stats`` the bytes and seconds of the reads alone; ``wait_seconds`` the time the caller
    waited for a group (the loading that did not overlap its work)."""

    def __init__(self, adapters: list[Adapter], groups: list[list[ModuleEntry]], order: list[int],
                 dtype: torch.dtype | None, ahead: bool = True):
        self.adapters, self.groups, self.order, self.dtype, self.ahead = adapters, groups, order, dtype, ahead
        self.stats = ReadStats()
        self.load_seconds = 0.0
        self.wait_seconds = 0.0

    def _load(self, gi: int) -> LoadedGroup:
        t0 = time.perf_counter()
        loaded = LoadedGroup(gi, load_group(self.adapters, self.groups[gi], self.dtype, self.stats))
        self.load_seconds += time.perf_counter() - t0      # only one thread loads
        return loaded

    def __iter__(self) -> Iterator[LoadedGroup]:
        if not self.ahead:
            for gi in self.order:
                t0 = time.perf_counter()
                loaded = self._load(gi)
                self.wait_seconds += time.perf_counter() - t0
                yield loaded
                del loaded
            return
        ready: queue.Queue = queue.Queue()       # LoadedGroup, the reader's exception, or _END
        slot = threading.Semaphore(1)       # taken by the reader per group, given back when the caller takes it
        stop = threading.Event()

        def reader():
            try:
                for gi in self.order:
                    slot.acquire()
                    if stop.is_set():
                        return
                    ready.put(self._load(gi))
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                ready.put(e)
                return
            ready.put(_END)

        thread = threading.Thread(target=reader, name="ctm-group-reader", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                loaded = ready.get()
                self.wait_seconds += time.perf_counter() - t0
                if loaded is _END:
                    return
                if isinstance(loaded, BaseException):
                    raise loaded
                slot.release()
                yield loaded
                del loaded
        finally:
            stop.set()
            slot.release()
            thread.join()
