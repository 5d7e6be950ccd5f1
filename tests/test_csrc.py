"""The compiled batched Jacobi eigensolver (csrc/, torch.ops.ctm_kernels.jacobi_eigh) on
the CPU against torch.linalg.eigh: eigenvalues, and the projectors onto eigenspaces
(eigenvectors themselves are only defined up to sign and, for repeated eigenvalues, up
to a rotation inside the eigenspace, so they are never compared directly)."""
from __future__ import annotations

import pytest
import torch

from ctm_kernels import backend
from ctm_kernels.ops import eig

pytestmark = pytest.mark.skipif(not backend.compiled_op("jacobi_eigh", "cpu"),
                                reason="ctm_kernels._C not built (pip install -e . --no-build-isolation)")


def jacobi(M, **kw):
    return torch.ops.ctm_kernels.jacobi_eigh(M, **kw)


def sym(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    return ((X + X.mT) / 2).to(dtype)


def with_spectrum(evals, seed=0):
    """Q diag(evals) Q^T with a random orthogonal Q: ``evals [B, n]`` -> ``[B, n, n]``."""
    g = torch.Generator().manual_seed(seed)
    Bn, n = evals.shape
    Q = torch.linalg.qr(torch.randn((Bn, n, n), generator=g, dtype=torch.float64)).Q
    return Q @ torch.diag_embed(evals) @ Q.mT


def cluster_projectors(w, V, rtol):
    """Spectral projectors of one matrix, grouping eigenvalues closer than rtol * ||A||."""
    scale = w.abs().max().clamp(min=1e-300)
    groups, start = [], 0
    for i in range(1, len(w) + 1):
        if i == len(w) or (w[i] - w[i - 1]) > rtol * scale:
            groups.append((start, i))
            start = i
    return [V[:, a:b] @ V[:, a:b].T for a, b in groups], groups


def check_against_eigh(M, tol):
    w, V = jacobi(M)
    assert w.dtype == M.dtype and V.dtype == M.dtype
    assert w.shape == M.shape[:-1] and V.shape == M.shape
    w0, V0 = torch.linalg.eigh(M.double())
    Mf, wf, Vf = M.reshape(-1, *M.shape[-2:]), w.reshape(-1, M.shape[-1]), V.reshape(-1, *M.shape[-2:])
    w0f, V0f = w0.reshape(wf.shape), V0.reshape(Vf.shape)
    for b in range(Mf.shape[0]):
        scale = w0f[b].abs().max().clamp(min=1e-300)
        assert torch.all(wf[b, 1:] >= wf[b, :-1]), "eigenvalues must be ascending"
        assert ((wf[b].double() - w0f[b]).abs().max() / scale) <= tol, f"eigenvalues of matrix {b}"
        P0, groups = cluster_projectors(w0f[b], V0f[b], 1e-6)
        Vb = Vf[b].double()
        for (a, c), p0 in zip(groups, P0):
            # eigenspaces are well separated (gap > 1e-6 ||A||) in these tests: error ~ eps / gap
            err = (Vb[:, a:c] @ Vb[:, a:c].T - p0).abs().max()
            assert err <= tol * 1e6, f"projector of eigenvalues {a}:{c} of matrix {b}: {err:.2e}"
        ortho = (Vb.T @ Vb - torch.eye(Vb.shape[0], dtype=torch.float64)).abs().max()
        assert ortho <= tol * 10, f"orthonormality of matrix {b}: {ortho:.2e}"


TOL = {torch.float64: 1e-13, torch.float32: 5e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch,n", [(1, 1), (1, 2), (3, 5), (9, 16), (4, 33), (2, 64)],
                         ids=["n1", "n2", "odd", "batch-not-multiple-of-lanes", "n33", "n64"])
def test_random_symmetric(batch, n, dtype):
    check_against_eigh(sym((batch, n, n), dtype, seed=n), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_repeated_eigenvalues_give_the_eigenspace(dtype):
    evals = torch.tensor([[3.0, 3.0, 3.0, -1.0, 0.5, 0.5, 7.0, 2.0],
                          [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    check_against_eigh(with_spectrum(evals).to(dtype), TOL[dtype])


def test_psd_with_tiny_and_huge_eigenvalues():
    # condition 1e12 and exact zeros, as in the Gram matrices of near-duplicate adapters
    evals = torch.tensor([[1e6, 1.0, 1e-6, 0.0, 0.0, 3.0]], dtype=torch.float64)
    M = with_spectrum(evals, seed=3)
    w, _ = jacobi(M)
    assert (w - evals.sort().values).abs().max() <= 1e-13 * 1e6


def test_batch_dims_diagonal_and_zero_matrices():
    M = torch.zeros((2, 3, 4, 4), dtype=torch.float64)
    M[0, 1] = torch.diag(torch.tensor([4.0, -2.0, 1.0, 0.0], dtype=torch.float64))
    M[1, 2] = sym((4, 4), torch.float64, seed=7)
    w, V = jacobi(M)
    assert w.shape == (2, 3, 4) and V.shape == (2, 3, 4, 4)
    assert torch.equal(w[0, 1], torch.tensor([-2.0, 0.0, 1.0, 4.0], dtype=torch.float64))
    assert torch.equal(w[0, 0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(V[0, 0], torch.eye(4, dtype=torch.float64))
    check_against_eigh(M, TOL[torch.float64])


def test_non_contiguous_input_and_empty_batch():
    M = sym((3, 6, 6), torch.float64, seed=9).transpose(0, 0)[:, :, :]
    Mt = M.mT.contiguous().mT                      # same values, column-major storage
    assert not Mt.is_contiguous()
    w, V = jacobi(Mt)
    w0, _ = torch.linalg.eigh(M)
    assert (w - w0).abs().max() <= 1e-13 * w0.abs().max()
    w, V = jacobi(torch.empty((0, 5, 5), dtype=torch.float64))
    assert w.shape == (0, 5) and V.shape == (0, 5, 5)


def test_sweep_budget_and_tolerance_are_honoured():
    M = sym((4, 20, 20), torch.float64, seed=11)
    w1, V1 = jacobi(M, max_sweeps=1)
    offdiag = lambda V: (V.mT @ M @ V - torch.diag_embed(torch.diagonal(V.mT @ M @ V, 0, -2, -1))).norm()
    assert offdiag(V1) > 1e-3 * M.norm(), "one sweep cannot diagonalise a random 20x20 matrix"
    w, V = jacobi(M)
    assert offdiag(V) <= 1e-13 * M.norm()


@pytest.mark.parametrize("bad,match", [
    (torch.ones(3, 4, dtype=torch.float64), "expected a \\[..., n, n\\] tensor"),
    (torch.ones(2, 3, 3, dtype=torch.int64), "expected float32 or float64"),
    (torch.ones(2, 3, 3, dtype=torch.float16), "expected float32 or float64"),
], ids=["not-square", "int", "half"])
def test_bad_input_raises(bad, match):
    with pytest.raises(RuntimeError, match=match):
        jacobi(bad)


def test_eig_ops_route_small_batches_through_jacobi(monkeypatch):
    """eigh_batched(method="auto") uses the Jacobi exactly where the measured thresholds say."""
    M = sym((16, 6, 6), torch.float64, seed=13)
    calls = []
    real = torch.ops.ctm_kernels.jacobi_eigh

    class Spy:
        def jacobi_eigh(self, *a, **k):
            calls.append(a[0].shape)
            return real(*a, **k)

    monkeypatch.setattr(torch.ops, "ctm_kernels", Spy())
    monkeypatch.setitem(eig.JACOBI_MAX_N, ("cpu", torch.float64), 8)
    w, V = eig.eigh_batched(M)
    assert calls == [M.shape]
    monkeypatch.setitem(eig.JACOBI_MAX_N, ("cpu", torch.float64), 4)
    eig.eigh_batched(M)
    assert len(calls) == 1, "n = 6 above the threshold must use LAPACK"
    w0, _ = torch.linalg.eigh(M)
    assert (w - w0).abs().max() <= 1e-13 * w0.abs().max()
