"""Gram matrices of the stacked factors: G_B = (Bh*s)^T (Bh*s), G_A = Ah Ah^T.

The only O((m + n) R^2) step of the engine and its first pass over the factors. The
Triton path (``triton_gram.py``) computes both Grams of a batch of same-shape layers in
one launch, with fp32 (or fp64) accumulation.
"""
from __future__ import annotations

import torch

from ._common import PRECISIONS, check, check_devices, check_tensor, pick_backend


def gram_torch(B, A, scale=None, *, out_dtype=None):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]`` -> (G_B ``[L, R, R]``, G_A ``[L, R, R]``)."""
    out_dtype = out_dtype or torch.promote_types(B.dtype, torch.float32)
    B = B.to(out_dtype)
    A = A.to(out_dtype)
    G_B = B.mT @ B
    if scale is not None:
        s = scale.to(out_dtype)
        G_B = G_B * s[:, :, None] * s[:, None, :]
    return G_B, A @ A.mT


def gram(B, A, scale=None, *, out_dtype=None, backend=None, precision="ieee"):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]`` (per-column scale of B) or None ->
    (G_B ``[L, R, R]``, G_A ``[L, R, R]``) accumulated and returned in ``out_dtype``
    (default: float32, or float64 for float64 inputs).

    ``backend``: None (by device, see ``ctm_kernels.backend``), "torch", "triton" or
    "reference". ``precision`` (Triton, float32 operands): "ieee" or "tf32x3"."""
    check_tensor(B, "gram", "B", 3)
    check_tensor(A, "gram", "A", 3)
    L, m, R = B.shape
    check(A.shape[0] == L and A.shape[1] == R, "gram",
          f"A must be [L={L}, R={R}, n], got {tuple(A.shape)} for B {tuple(B.shape)}")
    if scale is not None:
        check_tensor(scale, "gram", "scale", 2)
        check(tuple(scale.shape) == (L, R), "gram", f"scale must be [{L}, {R}], got {tuple(scale.shape)}")
    check(precision in PRECISIONS, "gram", f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dtype = out_dtype or torch.promote_types(B.dtype, torch.float32)
    check(out_dtype in (torch.float32, torch.float64), "gram", f"out_dtype must be float32 or float64, got {out_dtype}")
    device = check_devices("gram", B, A, scale)
    if pick_backend(device, backend) == "triton" and L * R > 0:
        from .triton_gram import gram_triton
        return gram_triton(B, A, scale, out_dtype, precision=precision)
    return gram_torch(B, A, scale, out_dtype=out_dtype)
