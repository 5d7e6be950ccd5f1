"""Gram matrices of the stacked factors: G_B = (Bh*s)^T (Bh*s), G_A = Ah Ah^T."""
from __future__ import annotations

import torch


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


def gram(B, A, scale=None, *, out_dtype=None):
    return gram_torch(B, A, scale, out_dtype=out_dtype)
