"""Output factors from the stacked factors: B_out = (Bh*s) @ left, A_out = right @ Ah."""
from __future__ import annotations

import torch


def lift_torch(B, A, scale, left, right, out_dtype):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]``, left ``[L, R, r]``, right ``[L, r, R]``
    -> (B_out ``[L, m, r]``, A_out ``[L, r, n]``) in ``out_dtype``."""
    cdt = left.dtype
    if scale is not None:
        left = left * scale.to(cdt)[:, :, None]
    B_out = B.to(cdt) @ left
    A_out = right @ A.to(cdt)
    return B_out.to(out_dtype), A_out.to(out_dtype)


def lift(B, A, scale, left, right, out_dtype):
    return lift_torch(B, A, scale, left, right, out_dtype)
