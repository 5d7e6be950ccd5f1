"""Coordinates C_t = (Phi^T G_B[:, blk t]) (G_A[blk t, :] Psi) of every adapter."""
from __future__ import annotations

import torch


def project_torch(G_B, G_A, Phi, Psi, T):
    """G_B, G_A ``[L, R, R]``, Phi, Psi ``[L, R, r]`` -> C ``[L, T, r, r]`` (equal blocks R = T*rb)."""
    L, R, r = Phi.shape
    rb = R // T
    left = (Phi.mT @ G_B).reshape(L, r, T, rb).permute(0, 2, 1, 3)   # [L, T, r, rb]
    right = (G_A @ Psi).reshape(L, T, rb, r)                          # [L, T, rb, r]
    return left @ right


def project(G_B, G_A, Phi, Psi, T):
    return project_torch(G_B, G_A, Phi, Psi, T)
