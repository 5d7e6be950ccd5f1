"""Gram matrices of the stacked factors: G_B = (Bh*s)^T (Bh*s), G_A = Ah Ah^T.

The only O((m + n) R^2) step of the engine and its first pass over the factors. The
Triton path (``triton_gram.py``) computes both Grams of a batch of same-shape layers in
one launch, with fp32 (or fp64) accumulation.
"""
from __future__ import annotations

import torch

from ._common import PRECISIONS, check, check_devices, check_tensor, pick_backend


# Z Z^T by block rows up to the diagonal (the rest mirrored): 5/8 of the products with 4
# blocks. The HOSVD's Z Z^T, measured, 2 threads (fp64 / fp32): k = p = 512 2.3 -> 1.4 / 0.9 -> 0.8 ms,
# k = 1024, p = 4096 50.5 -> 36.5 / 26.6 -> 18.8 ms, k = 2048, p = 8192 405 -> 276 / 207 ->
# 141 ms; exactly the full product at p = k, within 3e-16 / 2e-7 (relative) at p = 4 k. The
# factors' Grams (float64, one thread): B^T B of B [4096, 2048] 1.05 -> 0.63 s, [14336, 2048]
# 2.65 -> 1.73 s, [4096, 512] 0.071 -> 0.054 s, within 2e-16 of the full product.
GRAM_BLOCKS = 4
GRAM_BLOCKS_MIN_K = 512


def gram_rows(Z):
    """``Z Z^T`` ``[L, k, k]`` for ``Z [L, k, p]``, by ``GRAM_BLOCKS`` block rows from
    ``GRAM_BLOCKS_MIN_K`` on (each block row multiplied only up to the diagonal, the upper part
    mirrored). Exactly symmetric: a diagonal block's upper triangle is its lower one mirrored
    (MKL's AVX-512 kernels do not return ``X X^T`` bit-symmetric; the AVX2 ones did)."""
    L, k, _ = Z.shape
    if k < GRAM_BLOCKS_MIN_K:
        return _mirror_lower(Z @ Z.mT)
    b = -(-k // GRAM_BLOCKS)
    M = Z.new_empty(L, k, k)
    for i in range(0, k, b):
        e = min(i + b, k)
        M[:, i:e, :e] = Z[:, i:e] @ Z[:, :e].mT
        M[:, :i, i:e] = M[:, i:e, :i].mT
        M[:, i:e, i:e] = _mirror_lower(M[:, i:e, i:e])
    return M


def _mirror_lower(M):
    """``M [..., k, k]`` with its strict upper triangle replaced by the lower one, mirrored."""
    return M.tril() + M.tril(-1).mT


def gram_torch(B, A, scale=None, *, out_dtype=None):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]`` -> (G_B ``[L, R, R]``, G_A ``[L, R, R]``)."""
    out_dtype = out_dtype or torch.promote_types(B.dtype, torch.float32)
    B = B.to(out_dtype)
    A = A.to(out_dtype)
    G_B = gram_rows(B.mT)
    if scale is not None:
        s = scale.to(out_dtype)
        G_B = G_B * s[:, :, None] * s[:, None, :]
    return G_B, gram_rows(A)


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
