"""The factored top-r eigensolver (ops/topr.py) and the Cholesky whitening of the engine."""
from __future__ import annotations

import pytest
import torch

from ctm_kernels import engine
from ctm_kernels.ops import topr


def _factor(L, k, p, *, gap, seed=0, dtype=torch.float64):
    """``Z [L, k, p]`` whose ``Z Z^T`` has singular values of ``Z`` decaying geometrically, with a
    relative gap ``gap`` between the 8th and 9th (a flat bulk, like the structured sets)."""
    g = torch.Generator().manual_seed(seed)
    Qk = torch.linalg.qr(torch.randn(L, k, k, generator=g, dtype=torch.float64)).Q
    Qp = torch.linalg.qr(torch.randn(L, p, p, generator=g, dtype=torch.float64)).Q
    n = min(k, p)
    s = 0.97 ** torch.arange(n, dtype=torch.float64)
    s[8:] /= 1 + gap
    return ((Qk[..., :n] * s) @ Qp[..., :n].mT).to(dtype)


def _sin(U, V):
    return torch.linalg.matrix_norm(V - U @ (U.mT @ V), ord=2).max().item()


@pytest.mark.parametrize("k, p", [(60, 80), (80, 40), (50, 50)])
def test_factored_matches_dense_to_rounding(k, p):
    Z = _factor(3, k, p, gap=0.01)
    w0, U0 = topr.top_r_dense(Z, 8)
    w, U, steps, done = topr.top_r_factored(Z, 8, guard=4, depth=2)
    assert bool(done.all())
    assert _sin(U0, U) <= 1e-11
    assert torch.allclose(w, w0, rtol=1e-13, atol=0)


def test_warm_start_needs_fewer_steps_and_zero_start_columns_are_fine():
    Z = _factor(2, 120, 120, gap=0.01, seed=1)
    _, U0 = topr.top_r_dense(Z, 8)
    cold = topr.top_r_factored(Z, 8, guard=4, depth=2)
    near = U0 + 1e-3 * torch.randn(U0.shape, generator=torch.Generator().manual_seed(2), dtype=U0.dtype)
    near[..., -1] = 0                      # a null column of the previous iterate
    warm = topr.top_r_factored(Z, 8, near, guard=4, depth=2)
    assert bool(cold[3].all()) and bool(warm[3].all())
    assert int(warm[2].max()) < int(cold[2].max())
    assert _sin(U0, warm[1]) <= 1e-11


def test_guard_block_is_what_converges_on_a_small_gap():
    """Without guard vectors the error shrinks with lambda_8 / lambda_9 (1.0001 here): the block
    of the earlier Krylov route did not converge in 60 steps; with 8 guard vectors it does."""
    Z = _factor(1, 200, 200, gap=1e-4, seed=3)
    assert not bool(topr.top_r_factored(Z, 8, guard=0, depth=1, max_steps=60)[3].all())
    assert bool(topr.top_r_factored(Z, 8, guard=8, depth=2, max_steps=60)[3].all())


def test_unconverged_layers_are_solved_densely():
    Z = _factor(2, 90, 90, gap=1e-4, seed=4)
    w0, U0 = topr.top_r_dense(Z, 8)
    w, U, steps, done = topr.top_r_factored(Z, 8, max_steps=0)
    assert not bool(done.any()) and int(steps.max()) == 0
    assert torch.equal(U, U0) and torch.equal(w, w0)


def test_float32_reaches_float32_rounding():
    Z = _factor(2, 100, 100, gap=0.05, seed=5)
    _, U0 = topr.top_r_dense(Z, 8)
    _, U, _, done = topr.top_r_factored(Z.float(), 8)
    assert bool(done.all())
    assert _sin(U0, U.double()) <= 1e-4


@pytest.mark.parametrize("call, match", [
    (lambda: topr.top_r_factored(torch.zeros(4, 4), 2), "Z must have 3 dims"),
    (lambda: topr.top_r_factored(torch.zeros(1, 4, 4), 5), r"r must be in \[1, 4\]"),
    (lambda: topr.top_r_factored(torch.zeros(1, 6, 4), 2, torch.zeros(1, 5, 2)), r"X0 must be \[1, 6, <= 6\]"),
    (lambda: topr.top_r_factored(torch.zeros(1, 4, 4, dtype=torch.bfloat16), 2), "unsupported dtype"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cost_model_sends_small_solves_dense_and_large_ones_factored():
    b = 16 + topr.GUARD
    small = topr.dense_seconds(128, 128, torch.float64) / topr.factored_step_seconds(128, 128, b, topr.DEPTH, torch.float64)
    large = topr.dense_seconds(2048, 2048, torch.float64) / topr.factored_step_seconds(2048, 2048, b, topr.DEPTH, torch.float64)
    assert small < engine.WARM_STEPS <= large


def _gram(F):
    return F.mT @ F


@pytest.mark.parametrize("kind", ["full", "padded", "duplicate"])
def test_gram_root_is_a_square_root_and_inverts_on_the_kept_directions(kind, monkeypatch):
    g = torch.Generator().manual_seed(6)
    F = torch.randn(2, 40, 12, generator=g, dtype=torch.float64)
    if kind == "padded":
        F[:, :, 5] = 0                      # rank padding: an exactly zero column
    if kind == "duplicate":
        F[1, :, 7] = F[1, :, 2]             # layer 1 rank-deficient: the eigh route
    calls = []
    eigh = engine.eig_op.eigh_batched
    monkeypatch.setattr(engine.eig_op, "eigh_batched", lambda M: calls.append(M.shape[0]) or eigh(M))
    G = _gram(F)
    Rf, W = engine._gram_root(G, engine.WHITEN_RTOL[torch.float64])
    assert calls == ([1] if kind == "duplicate" else [])
    assert torch.allclose(Rf.mT @ Rf, G, rtol=0, atol=1e-12 * G.abs().max())
    O = F @ W                               # orthonormal on the kept directions, zero elsewhere
    live = O.norm(dim=-2) > 0.5
    assert int(live.sum()) == {"full": 24, "padded": 22, "duplicate": 23}[kind]
    eye = torch.diag_embed(live.double())
    assert torch.allclose(O.mT @ O, eye, atol=1e-10)
    if kind == "full":                      # the Cholesky factor: upper triangular
        assert torch.equal(Rf, Rf.triu())


def test_a_slow_solve_turns_dense_early():
    """On a gap of 1e-4 the measured rate predicts far more steps than a dense solve's worth:
    the solver stops after its third step and answers densely."""
    Z = _factor(1, 200, 200, gap=1e-4, seed=3)
    w0, U0 = topr.top_r_dense(Z, 8)
    w, U, steps, done = topr.top_r_factored(Z, 8, guard=0, depth=1, max_steps=60, dense_steps=5)
    assert int(steps.max()) == 3 and not bool(done.any())
    assert torch.equal(U, U0)
    fast = topr.top_r_factored(Z, 8, guard=8, depth=2, max_steps=60, dense_steps=50)
    assert bool(fast[3].all())


def test_dense_solve_survives_a_float32_eigensolver_failure(monkeypatch):
    """float32 LAPACK eigh did not converge on a rank-padded set with R > m (a 210 x 210
    ``Z Z^T`` with 105 zero rows); the solve is redone in float64 and matches it."""
    g = torch.Generator().manual_seed(3)
    Z = torch.zeros(1, 210, 84, dtype=torch.float64)
    Z[:, :105] = torch.randn(1, 105, 84, generator=g, dtype=torch.float64)
    want_w, want_U = topr.top_r_dense(Z, 6)
    solve = topr.topk_eigh

    def failing_in_float32(M, k):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return solve(M, k)
    monkeypatch.setattr(topr, "topk_eigh", failing_in_float32)
    w, U = topr.top_r_dense(Z.float(), 6)
    assert w.dtype == torch.float32 and U.dtype == torch.float32
    assert torch.allclose(w.double(), want_w, rtol=1e-5)
    assert float((U.double() @ U.double().mT - want_U @ want_U.mT).norm()) <= 1e-4


def test_float32_retry_reaches_through_the_partial_solver(monkeypatch):
    """With the partial route taken and failing (LAPACK refuses, torch's float32 eigh does not
    converge), the solve is still redone in float64 and returned in float32."""
    import scipy.linalg

    g = torch.Generator().manual_seed(4)
    Z = torch.randn(2, 300, 40, generator=g, dtype=torch.float64)
    want_w, want_U = topr.top_r_dense(Z, 8)
    monkeypatch.setenv("CTM_KERNELS_TOPK_EIGH", "partial")

    def refusing(a, **kw):
        if a.dtype == "float32":
            raise scipy.linalg.LinAlgError("did not converge")
        return solve(a, **kw)
    solve = scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh", refusing)
    eigh = torch.linalg.eigh

    def failing_in_float32(M):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return eigh(M)
    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    w, U = topr.top_r_dense(Z.float(), 8)
    assert w.dtype == torch.float32 and U.shape == (2, 300, 8)
    assert torch.allclose(w.double(), want_w, rtol=1e-5)
    assert float((U.double() @ U.double().mT - want_U @ want_U.mT).norm()) <= 1e-4


def _count_routes(monkeypatch):
    """Wrap both top-r routes; returns the list of (route, steps) of every solve."""
    seen = []
    dense, factored = topr.top_r_dense, topr.top_r_factored

    def counted_factored(*a, **kw):
        out = factored(*a, **kw)
        seen.append(("factored", int(out[2].max()), bool(out[3].all())))
        return out

    monkeypatch.setattr(topr, "top_r_factored", counted_factored)
    monkeypatch.setattr(topr, "top_r_dense", lambda *a, **kw: seen.append(("dense", 0, True)) or dense(*a, **kw))
    return seen


def test_half_steps_follow_the_steps_their_side_took(monkeypatch):
    """A dense solve priced at 6 factored steps (below WARM_STEPS): the warm half-steps are
    dense by default, so nothing goes factored; once a side has had HINT_SOLVES factored solves
    in a row (forced here), its next half-steps are expected to take as many steps as the last
    one plus one and go factored; after a single one they stay dense. The answer is the dense
    route's at tight tol."""
    from benchmarks.bench_layer import make_adapters

    A, B = make_adapters("gaussian", 96, 48, 8, 8, torch.float64, "cpu")   # sides of 64 and 48
    tight = dict(rank=8, stop="subspace", tol=1e-10, max_iter=5000, method="sum")
    dense = engine.merge_layer(A, B, **tight)
    monkeypatch.setattr(topr, "dense_seconds", lambda k, p, dtype: 6 * topr.factored_step_seconds(
        k, p, min(k, 8 + topr.GUARD), topr.DEPTH, dtype))
    seen = _count_routes(monkeypatch)
    engine.merge_layer(A, B, **tight)
    assert all(route == "dense" for route, _, _ in seen)          # WARM_STEPS > 6: never factored
    half_step = engine._half_step
    assert engine.HINT_SOLVES == 2
    for forced in (1, 2):
        seen.clear()
        count = {}

        def forcing(Rx, Ry, V, T, rank, X0=None, expected=None):
            side = Rx.shape[1]
            if count.get(side, 0) < forced:
                count[side] = count.get(side, 0) + 1
                expected = 1                            # the first warm solves of a side go factored
            return half_step(Rx, Ry, V, T, rank, X0, expected)

        monkeypatch.setattr(engine, "_half_step", forcing)
        out = engine.merge_layer(A, B, **tight)
        factored = [s for route, s, ok in seen if route == "factored" and ok]
        assert len(count) == 2 and max(factored) <= 6
        assert (len(factored) > sum(count.values())) == (forced == 2), (forced, len(factored))
        assert float((out.delta - dense.delta).norm() / dense.delta.norm()) < 1e-8


@pytest.mark.parametrize("T,rb,r", [(1, 3, 2), (5, 4, 3), (7, 1, 1)], ids=lambda v: str(v))
def test_half_step_objective_is_the_norm_of_the_projected_images(T, rb, r):
    """``half_step_objective`` (no ``Z`` formed) against ``||U^T Z||^2`` with ``Z`` formed."""
    g = torch.Generator().manual_seed(T * 100 + rb)
    L, k, kp = 2, 9, 6
    Rx = torch.randn(L, k, T * rb, generator=g, dtype=torch.float64)
    Ry = torch.randn(L, kp, T * rb, generator=g, dtype=torch.float64)
    V = torch.linalg.qr(torch.randn(L, kp, r, generator=g, dtype=torch.float64))[0]
    U = torch.linalg.qr(torch.randn(L, k, r, generator=g, dtype=torch.float64))[0]
    want = (U.mT @ engine.half_step_images(Rx, Ry, V, T)).square().sum((-2, -1))
    got = engine.half_step_objective(Rx, Ry, V, U, T)
    assert got.shape == (L,) and torch.allclose(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("k,p", [(511, 40), (512, 512), (513, 1030), (1100, 300)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gram_by_block_rows_is_the_full_product(k, p, dtype, monkeypatch):
    """``gram_rows`` against ``Z Z^T`` (k not a multiple of the blocks, p < k and p > k, below
    and above GRAM_BLOCKS_MIN_K), into NaN-filled memory: every entry written, and the result
    exactly symmetric."""
    Z = torch.randn(2, k, p, generator=torch.Generator().manual_seed(k), dtype=dtype)
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *size, **kw: torch.full(size, float("nan"), dtype=self.dtype))
    want = Z.double() @ Z.double().mT
    got = topr.gram_rows(Z)
    assert torch.isfinite(got).all() and torch.equal(got, got.mT)
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert float((got.double() - want).norm() / want.norm()) < tol
