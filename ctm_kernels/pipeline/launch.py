"""Where a merge runs: the device, and the ranks that ``torchrun -m ctm_kernels`` starts.

:func:`launched_ranks` reads torchrun's environment and imports nothing, so the command line
knows at once which rank it is; torch is imported only when a device is checked or a process
group is set up.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from ..options import suggest


def launched_ranks() -> tuple[int, int]:
    """``(rank, world size)`` set by torchrun (``(0, 1)`` otherwise)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def check_device(device):
    """The merge's ``torch.device`` (None: the inputs' device); one that this torch cannot use
    is bad input, not an internal error."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        word = str(device).split(":")[0].lower()
        hint = " (did you mean cuda?)" if word in ("gpu", "cuda0", "nvidia") else suggest(word, ("cpu", "cuda"))
        raise ValueError(f"unknown device {device!r}{hint}; the merge runs on cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the merge runs on cpu or cuda")
    return dev


@contextmanager
def process_group(device):
    """Under torchrun (WORLD_SIZE > 1) and no process group yet: create one for the merge
    (nccl for a CUDA merge, each rank on the GPU of its LOCAL_RANK; gloo otherwise) and destroy
    it afterwards. Yields ``(rank, device)``."""
    rank, world = launched_ranks()
    if world <= 1:
        yield 0, device
        return
    import torch
    import torch.distributed as dist

    device = check_device(device)          # a missing CUDA fails here, before any rendezvous
    if dist.is_initialized():
        yield dist.get_rank(), device
        return
    if device is not None and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), device
    finally:
        dist.destroy_process_group()
