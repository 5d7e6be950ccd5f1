"""Output factors from the stacked factors: B_out = (Bh*s) @ left, A_out = right @ Ah.

The second and last pass over the factors. The Triton path (``triton_lift.py``) writes
both outputs of a batch of layers in one launch, directly in the output dtype.
"""
from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, PRECISIONS, check, check_devices, check_tensor, pick_backend


def lift_torch(B, A, scale, left, right, out_dtype):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]``, left ``[L, R, r]``, right ``[L, r, R]``
    -> (B_out ``[L, m, r]``, A_out ``[L, r, n]``) in ``out_dtype``."""
    cdt = left.dtype
    if scale is not None:
        left = left * scale.to(cdt)[:, :, None]
    B_out = B.to(cdt) @ left
    A_out = right.to(cdt) @ A.to(cdt)
    return B_out.to(out_dtype), A_out.to(out_dtype)


def lift(B, A, scale, left, right, out_dtype, *, backend=None, precision="ieee"):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]`` or None, left ``[L, R, r]``,
    right ``[L, r, R]`` -> (B_out ``[L, m, r]`` = (B*scale) @ left, A_out ``[L, r, n]`` =
    right @ A) in ``out_dtype``, computed in the dtype of ``left`` (float32 or float64).
    ``backend``/``precision`` as in :func:`ctm_kernels.ops.gram.gram`."""
    check_tensor(B, "lift", "B", 3)
    check_tensor(A, "lift", "A", 3)
    check_tensor(left, "lift", "left", 3, (torch.float32, torch.float64))
    check_tensor(right, "lift", "right", 3, (torch.float32, torch.float64))
    L, m, R = B.shape
    r = left.shape[2]
    check(A.shape[0] == L and A.shape[1] == R, "lift", f"A must be [L={L}, R={R}, n], got {tuple(A.shape)}")
    check(tuple(left.shape[:2]) == (L, R), "lift", f"left must be [{L}, {R}, r], got {tuple(left.shape)}")
    check(tuple(right.shape) == (L, r, R), "lift", f"right must be [{L}, {r}, {R}], got {tuple(right.shape)}")
    if scale is not None:
        check_tensor(scale, "lift", "scale", 2)
        check(tuple(scale.shape) == (L, R), "lift", f"scale must be [{L}, {R}], got {tuple(scale.shape)}")
    check(out_dtype in FLOAT_DTYPES, "lift", f"out_dtype must be a float dtype, got {out_dtype}")
    check(precision in PRECISIONS, "lift", f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = check_devices("lift", B, A, scale, left, right)
    if pick_backend(device, backend) == "triton" and L * r > 0 and m + A.shape[2] > 0:
        from .triton_lift import lift_triton
        return lift_triton(B, A, scale, left, right.to(left.dtype), out_dtype, precision=precision)
    return lift_torch(B, A, scale, left, right, out_dtype)
