"""Coordinates C_t = (Phi^T G_B[:, blk t]) (G_A[blk t, :] Psi) of every adapter.

The Triton path (``triton_project.py``) computes all blocks of all layers in one launch.
"""
from __future__ import annotations

import torch

from ._common import PRECISIONS, check, check_devices, check_tensor, pick_backend


def project_torch(G_B, G_A, Phi, Psi, T):
    """G_B, G_A ``[L, R, R]``, Phi, Psi ``[L, R, r]`` -> C ``[L, T, r, r]`` (equal blocks R = T*rb)."""
    L, R, r = Phi.shape
    rb = R // T
    left = (Phi.mT @ G_B).reshape(L, r, T, rb).permute(0, 2, 1, 3)   # [L, T, r, rb]
    right = (G_A @ Psi).reshape(L, T, rb, r)                          # [L, T, rb, r]
    return left @ right


def project(G_B, G_A, Phi, Psi, T, *, backend=None, precision="ieee"):
    """G_B, G_A ``[L, R, R]``, Phi, Psi ``[L, R, r]`` (float32 or float64) -> C ``[L, T, r, r]``
    in the dtype of Phi, ``C_t = (Phi^T G_B[:, blk t]) (G_A[blk t, :] Psi)`` with equal blocks
    ``R = T * rb``. ``backend``/``precision`` as in :func:`ctm_kernels.ops.gram.gram`."""
    for name, x in (("G_B", G_B), ("G_A", G_A), ("Phi", Phi), ("Psi", Psi)):
        check_tensor(x, "project", name, 3, (torch.float32, torch.float64))
    L, R, r = Phi.shape
    check(isinstance(T, int) and T >= 1 and R % T == 0, "project", f"T must be a positive divisor of R={R}, got {T!r}")
    check(tuple(G_B.shape) == (L, R, R) and tuple(G_A.shape) == (L, R, R), "project",
          f"G_B and G_A must be [{L}, {R}, {R}], got {tuple(G_B.shape)} and {tuple(G_A.shape)}")
    check(tuple(Psi.shape) == (L, R, r), "project", f"Psi must be [{L}, {R}, {r}], got {tuple(Psi.shape)}")
    check(precision in PRECISIONS, "project", f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = check_devices("project", G_B, G_A, Phi, Psi)
    if pick_backend(device, backend) == "triton" and L * R * r > 0:
        from .triton_project import project_triton
        return project_triton(G_B, G_A, Phi, Psi, T, precision=precision)
    dt = Phi.dtype
    return project_torch(G_B.to(dt), G_A.to(dt), Phi, Psi.to(dt), T)
