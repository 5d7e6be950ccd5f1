"""Argument checks and small helpers shared by the ops."""
from __future__ import annotations

import torch

from .. import backend as _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# tl.dot input precisions for float32 operands: exact products ("ieee") or tensor-core
# TF32 emulated with three passes ("tf32x3", about fp32 accuracy; measured by
# benchmarks/bench_kernels.py). Plain "tf32" is not offered: it keeps 10 mantissa bits
# and the Grams square the condition number.
PRECISIONS = ("ieee", "tf32x3")


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"ctm_kernels.ops.{op}: {msg}")


def check_tensor(x, op: str, name: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    check(isinstance(x, torch.Tensor), op, f"{name} must be a tensor, got {type(x).__name__}")
    check(x.dim() == ndim, op, f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    check(x.dtype in dtypes, op, f"{name} has unsupported dtype {x.dtype}")


def check_devices(op: str, *tensors) -> torch.device:
    devs = {t.device for t in tensors if t is not None}
    check(len(devs) == 1, op, f"all inputs must be on one device, got {sorted(map(str, devs))}")
    return devs.pop()


def pick_backend(device, requested: str | None) -> str:
    """``ops`` run the torch code under the ``reference`` backend (it replaces the engine,
    not the ops)."""
    name = _backend.resolve(device, requested)
    return "torch" if name == "reference" else name


def pow2(x: int, lo: int = 16) -> int:
    """Smallest power of two >= max(x, lo) (tl.dot needs every dim >= 16)."""
    return max(lo, 1 << max(0, int(x) - 1).bit_length())
