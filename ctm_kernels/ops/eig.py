"""Batched small symmetric eigensolves."""
from __future__ import annotations

import torch


def eigh_batched(M):
    """M ``[L, p, p]`` symmetric -> (evals ``[L, p]`` ascending, evecs ``[L, p, p]``)."""
    return torch.linalg.eigh(M)


def topk_eigh(M, k):
    """M ``[L, p, p]`` symmetric -> (evals ``[L, k]`` descending, evecs ``[L, p, k]``)."""
    w, Q = eigh_batched(M)
    return w.flip(-1)[..., :k], Q.flip(-1)[..., :k]
