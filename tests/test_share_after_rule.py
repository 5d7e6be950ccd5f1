"""The per-adapter share kept after the rule, against its dense float64 definition
``share_t = <dW_t, dW_merged> / ||dW_t||_F^2``."""
from __future__ import annotations

import pytest
import torch

import ctm_kernels
from ctm_kernels import reference, rules

F64 = torch.float64


def adapters(T=4, m=20, n=16, r_t=3, seed=0, zero=None):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r_t, n, generator=g, dtype=F64) for _ in range(T)]
    B = [torch.randn(m, r_t, generator=g, dtype=F64) * (0.5 + t) for t in range(T)]
    if zero is not None:
        B[zero] = torch.zeros_like(B[zero])
    return A, B


def dense_share(A, B, merged, scales, weights):
    dW = reference.dense_updates(A, B, scales, weights)              # [T, m, n]
    inner = (dW * merged.double()).sum((-2, -1))
    nu2 = dW.square().sum((-2, -1))
    return torch.where(nu2 > 0, inner / nu2.clamp(min=1e-300), 0.0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("method,params,scale", [("sum", {}, 1.0), ("ties", {"top_k": 0.3}, 0.7),
                                                 ("tsv", {}, -1.5), ("dare_ties", {"p": 0.3, "seed": 2}, 2.0)])
def test_share_matches_dense_definition(method, params, scale, backend):
    A, B = adapters(zero=2)
    scales, weights = [2.0, 0.5, 1.0, 1.0], [1.0, 0.8, 1.0, 1.3]
    plan = ctm_kernels.prepare(A, B, rank=5, scales=scales, weights=weights, stop="subspace", tol=1e-10, backend=backend)
    out = plan.merge(method, scale=scale, **params)
    want = dense_share(A, B, out.delta, scales, weights)
    got = torch.tensor(out.share_after_rule, dtype=F64)
    assert got.shape == (4,) and got[2] == 0.0
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got.tolist(), want.tolist())
    # rank 5 of 9 live directions: every subspace leaves part of dW_t out, so a share taken
    # over the in-subspace part (<C_t, C> / ||C_t||^2) would differ from this one
    assert max(plan.info.energy_kept) < 0.99


def test_share_in_batched_merge():
    layers = [adapters(seed=s) for s in (1, 2, 3)]
    outs = ctm_kernels.merge_layers(layers, rank=4, method="ties", top_k=0.5, scale=1.2, stop="subspace", tol=1e-10)
    for (A, B), out in zip(layers, outs):
        want = dense_share(A, B, out.delta, None, None)
        assert torch.allclose(torch.tensor(out.share_after_rule, dtype=F64), want, rtol=1e-9, atol=1e-12)


def test_share_known_answer():
    """Coordinates C_1 = diag(1, 0), C_2 = diag(0, 2), nu = (1, 4) (C_2 keeps half of dW_2's
    norm); merged sum diag(1, 2) at scale 0.5: shares 0.5 * 1 / 1 and 0.5 * 4 / 16."""
    C = torch.stack([torch.diag(torch.tensor([1.0, 0.0], dtype=F64)),
                     torch.diag(torch.tensor([0.0, 2.0], dtype=F64))])[None]
    share = rules.share_after_rule(C, C.sum(1), torch.tensor([[1.0, 4.0]], dtype=F64), 0.5)
    assert share.tolist() == [[0.5, 0.125]]
    assert rules.share_after_rule(C, C.sum(1), torch.tensor([[0.0, 4.0]], dtype=F64))[0, 0] == 0.0
