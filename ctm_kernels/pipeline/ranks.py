"""The processes of a merge: this one alone, or the ranks of a ``torch.distributed`` group.

Everything the pipeline shares between ranks goes through :class:`Ranks`: which groups each
rank merges, and the one failure protocol (:meth:`Ranks.together`, a step on every rank;
:meth:`Ranks.first`, a step on rank 0; an error on one rank is raised on every rank).
:mod:`.launch` sets up the group for ``torchrun -m ctm_kernels``. No other module touches
``torch.distributed``.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class Ranks:
    """This process alone (``world == 1``), or the current ``torch.distributed`` group."""

    def __init__(self, dist=None):
        self.dist = dist
        self.world = dist.get_world_size() if dist is not None else 1
        self.rank = dist.get_rank() if dist is not None else 0

    @classmethod
    def detect(cls, distributed) -> "Ranks":
        """``distributed``: None uses an initialised group of more than one rank, False ignores
        it, True requires it."""
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        if distributed is False:
            return cls()
        if dist.is_available() and dist.is_initialized():
            return cls(dist) if dist.get_world_size() > 1 else cls()
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group "
                             "(torch.distributed.init_process_group, or launch with torchrun)")
        return cls()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, by rank, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def share(self, sizes: list[int]) -> list[int]:
        """The groups (indices into ``sizes``, their bytes) this rank merges: largest groups
        first, each to the rank with the fewest bytes so far (ties to the lower rank), each
        rank's list in plan order. Deterministic, so every rank computes the same split."""
        load = [0] * self.world
        owned: list[list[int]] = [[] for _ in range(self.world)]
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owned[r].append(i)
            load[r] += sizes[i]
        return sorted(owned[self.rank])

    def together(self, fn: Callable[[], T]) -> list[T]:
        """``fn()`` on every rank; every rank's result, by rank, on every rank. An error on any
        rank is raised on every rank (:func:`relay`)."""
        if self.world == 1:
            return [fn()]
        own, value = None, None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            own = e
        gathered = self.gather((failure(own), value))
        relay([f for f, _ in gathered], own)
        return [v for _, v in gathered]

    def first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone; its result on every rank, its error raised on every rank."""
        if self.world == 1:
            return fn()
        own, value = None, None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                own = e
        f, value = self.broadcast((failure(own), value))
        relay([f], own)
        return value


def failure(e: BaseException | None) -> tuple[str, str] | None:
    """What other ranks need to re-raise an error: its kind and its one-line message."""
    if e is None:
        return None
    if isinstance(e, ValueError):
        return "value", str(e)
    return "internal", f"{type(e).__name__}: {e}"


def relay(failures: list, own: BaseException | None) -> None:
    """Raise if any rank failed: this rank's own error, or else the first failed rank's."""
    if own is not None:
        raise own
    for r, f in enumerate(failures):
        if f is not None:
            kind, msg = f
            raise (ValueError if kind == "value" else RuntimeError)(f"rank {r}: {msg}")
