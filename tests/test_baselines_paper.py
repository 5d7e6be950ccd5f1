"""The MtC baselines whose spectrum step follows the CtM paper's code, against small float64
constructions written from their definitions (DESIGN.md section 5):

* Iso-C MtC: sum, truncate to rank r, then set those r singular values to their mean;
* TSV in the dense space: per task the top floor(min(m, n) / T) singular triplets, null-space
  ones included, concatenated, each concatenation replaced by its polar factor
  ``X (X^T X)^(-1/2)``, recombined with the kept singular values.
"""
from __future__ import annotations

import pytest
import torch

from ctm_kernels import reference, rules

F64 = torch.float64


def lora_set(T, m, n, r_t, seed):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r_t, n, generator=g, dtype=F64) for _ in range(T)]
    B = [torch.randn(m, r_t, generator=g, dtype=F64) * (1 + t) for t in range(T)]
    return A, B, reference.dense_updates(A, B)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def iso_mtc_by_definition(dWs, rank):
    U, S, Vh = torch.linalg.svd(dWs.sum(0))
    S = S[:rank]
    nonzero = S > 1e-10 * S[0]
    flat = torch.where(nonzero, S[nonzero].mean(), 0.0)
    return U[:, :rank] @ torch.diag(flat) @ Vh[:rank]


@pytest.mark.parametrize("rank", [4, 8])
def test_iso_c_mtc_truncates_then_flattens(rank):
    """rank 4 < rank of the sum (6); rank 8 > 6: the mean is over the 6 nonzero values."""
    A, B, dWs = lora_set(3, 12, 10, 2, seed=0)
    want = iso_mtc_by_definition(dWs, rank)
    Bm, Am = reference.mtc(dWs, rank, "iso_c")
    assert rel(Bm @ Am, want) < 1e-12
    Bc, Ac = reference.core_mtc(A, B, rank, "iso_c")          # the core space holds the whole sum
    assert rel(Bc @ Ac, want) < 1e-12
    Bs, As = reference.mtc(dWs, rank, "iso_c", scale=-0.5)
    assert rel(Bs @ As, -0.5 * want) < 1e-12
    # the other order (flatten every nonzero value of the sum, then truncate) is a different
    # update whenever the rank cuts the sum's spectrum
    Bf, Af = reference.truncate(reference.full_merge(dWs, "iso_c"), rank)
    if rank < 6:
        assert rel(Bf @ Af, want) > 0.1


def polar_by_definition(X):
    w, Q = torch.linalg.eigh(X.mT @ X)
    return X @ Q @ torch.diag(w.rsqrt()) @ Q.mT


def tsv_dense_by_definition(dWs, keep_null=True):
    T, m, n = dWs.shape
    k = min(m, n) // T
    Us, Ss, Vs = [], [], []
    for dW in dWs:
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        keep = k if keep_null else int((S > 1e-10 * S[0]).sum().clamp(max=k))
        Us.append(U[:, :keep])
        Ss.append(S[:keep])
        Vs.append(Vh[:keep].mT)
    PU, PV = polar_by_definition(torch.cat(Us, 1)), polar_by_definition(torch.cat(Vs, 1))
    return PU @ torch.diag(torch.cat(Ss)) @ PV.mT


def test_tsv_dense_keeps_null_space_vectors():
    """Rank-1 adapters on 6 x 6, T = 2: each keeps k = 3 triplets, two of them null-space ones."""
    A, B, dWs = lora_set(2, 6, 6, 1, seed=3)
    want = tsv_dense_by_definition(dWs)
    assert rel(reference.full_merge(dWs, "tsv"), want) < 1e-10
    Bm, Am = reference.mtc(dWs, 2, "tsv")
    Bt, At = reference.truncate(want, 2)
    assert rel(Bm @ Am, Bt @ At) < 1e-10
    # the rule's own TSV drops the null-space components: a different answer here
    nonnull = reference.full_merge(dWs, "tsv_nonnull")
    assert rel(nonnull, tsv_dense_by_definition(dWs, keep_null=False)) < 1e-10
    assert rel(nonnull, want) > 0.1


def test_tsv_merge_variants_agree_on_full_rank_tasks():
    """Where no kept singular value is zero (CtM coordinates of full-rank tasks) the two
    variants are the same computation."""
    g = torch.Generator().manual_seed(5)
    C = torch.randn(2, 3, 6, 6, generator=g, dtype=F64)
    assert torch.allclose(rules.tsv_merge(C, keep_null=True), rules.tsv_merge(C, keep_null=False), atol=1e-12)
    assert rel(rules.tsv_merge(C[:1], keep_null=True)[0], tsv_dense_by_definition(C[0])) < 1e-10
