"""The factored top-r eigensolver (ops/topr.py) and the Cholesky whitening of the engine."""
from __future__ import annotations

import pytest
import torch

from ctm_kernels import engine
from ctm_kernels.ops import topr
from ctm_kernels.ops.gram import gram_rows

from adapters import relerr


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
    assert small < engine.DEFAULT_SOLVER.warm_steps <= large


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
    R = F.shape[-1]
    Wm = W @ torch.eye(R, dtype=F.dtype).expand(2, R, R)     # W is applied, never formed: form it here
    X = torch.randn(2, R, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(W.t_matmul(X), Wm.mT @ X, atol=1e-12 * float(Wm.abs().max()))
    O = F @ Wm                              # orthonormal on the kept directions, zero elsewhere
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
    """Plain HOOI (``accelerate=False``, the exact half-steps). A dense solve priced at 6
    factored steps (below the settings' warm_steps): the warm half-steps are
    dense by default, so nothing goes factored; once a side has had hint_solves factored solves
    in a row (forced here), its next half-steps are expected to take as many steps as the last
    one plus one and go factored; after a single one they stay dense. The answer is the dense
    route's at tight tol."""
    from benchmarks.bench_layer import make_adapters

    A, B = make_adapters("gaussian", 96, 48, 8, 8, torch.float64, "cpu")   # sides of 64 and 48
    tight = dict(rank=8, stop="subspace", tol=1e-10, max_iter=5000, method="sum", accelerate=False)
    dense = engine.merge_layer(A, B, **tight)
    monkeypatch.setattr(topr, "dense_seconds", lambda k, p, dtype: 6 * topr.factored_step_seconds(
        k, p, min(k, 8 + topr.GUARD), topr.DEPTH, dtype))
    seen = _count_routes(monkeypatch)
    engine.merge_layer(A, B, **tight)
    assert all(route == "dense" for route, _, _ in seen)          # warm_steps > 6: never factored
    top_r = engine._top_r
    assert engine.DEFAULT_SOLVER.hint_solves == 2
    for forced in (1, 2):
        seen.clear()
        count = {}

        def forcing(Z, rank, settings, X0=None, expected=None):
            side = Z.shape[1]
            if X0 is not None and count.get(side, 0) < forced:     # a warm half-step, not the HOSVD
                count[side] = count.get(side, 0) + 1
                expected = 1                            # the first warm solves of a side go factored
            return top_r(Z, rank, settings, X0, expected)

        monkeypatch.setattr(engine, "_top_r", forcing)
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
    want = (U.mT @ engine.half_step_images(Rx, Ry, V, T).dense()).square().sum((-2, -1))
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
    got = gram_rows(Z)
    assert torch.isfinite(got).all() and torch.equal(got, got.mT)
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert float((got.double() - want).norm() / want.norm()) < tol


# ------------------------------------------------------------------------------------------
# the block half-step (block_step): one warm-started Chebyshev-filtered step on b columns


def _spectrum_factor(L, k, p, sv, seed=0, dtype=torch.float64):
    """``Z [L, k, p]`` with singular values ``sv`` (``Z Z^T`` has their squares, the rest zero)."""
    g = torch.Generator().manual_seed(seed)
    n = len(sv)
    Qk = torch.linalg.qr(torch.randn(L, k, n, generator=g, dtype=torch.float64)).Q
    Qp = torch.linalg.qr(torch.randn(L, p, n, generator=g, dtype=torch.float64)).Q
    return ((Qk * torch.as_tensor(sv, dtype=torch.float64)) @ Qp.mT).to(dtype)


def _projector_gap(U, W):
    return float(torch.linalg.matrix_norm(U @ U.mT - W @ W.mT, ord=2).max())


BLOCK_CASES = {
    # name: (k, p, r, b, singular values)
    "flat_bulk": (90, 70, 8, 16, [3.0, 2.5, 2.0] + [1.0 - 0.004 * i for i in range(60)]),
    "r1": (33, 41, 1, 9, [2.0] + [1.0 - 0.01 * i for i in range(30)]),
    "rank_deficient": (50, 6, 4, 12, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]),   # Z Z^T of rank 6 < b
    "block_is_everything": (17, 30, 5, 17, [2.0 ** -i for i in range(17)]),
    "ill_conditioned": (64, 64, 6, 14, [10.0 ** (-i / 3) for i in range(40)]),   # cond(M) = 1e26
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_steps_reach_the_top_eigenvectors(case, dtype):
    """Repeated block steps from a random block end at the float64 eigh's top-r subspace
    (projectors) and eigenvalues, on a flat bulk, r = 1, a Z Z^T of lower rank than the block,
    a block as wide as the space and an ill-conditioned spectrum, in float64 and float32."""
    k, p, r, b, sv = BLOCK_CASES[case]
    Z = _spectrum_factor(2, k, p, sv, seed=len(case), dtype=dtype)
    lam, X = torch.linalg.eigh(Z.double() @ Z.double().mT)
    want_w, want_U = lam.flip(-1)[:, :r], X.flip(-1)[..., :r]
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(2, k, b, generator=g, dtype=torch.float64)).Q.to(dtype)
    for _ in range(40):
        th, Q, degree = topr.block_step(Z, Q, r)
    assert Q.dtype == dtype and th.shape == (2, b) and Q.shape == (2, k, b)
    assert torch.allclose(Q.mT @ Q, torch.eye(b, dtype=dtype).expand(2, b, b), atol=50 * torch.finfo(dtype).eps)
    assert bool((th[:, :-1] >= th[:, 1:]).all())                 # descending Ritz values
    eps = torch.finfo(dtype).eps
    # top-r subspace to rounding where the gap allows (rank_deficient: exact top 4 of 6)
    gap = float((want_w[:, -1] - lam.flip(-1)[:, r]).min() / want_w[:, 0].min())
    assert _projector_gap(Q[..., :r].double(), want_U) <= 200 * eps / gap
    assert torch.allclose(th[:, :r].double(), want_w, rtol=200 * eps, atol=200 * eps * float(want_w.max()))
    if case == "block_is_everything":
        assert int(degree.max()) == 0                       # Rayleigh-Ritz alone, no filter


def test_block_step_leaves_an_invariant_block_where_it_is():
    """The top-b eigenvectors are a fixed point: one step keeps the block's top-r subspace to
    rounding (what makes HOOI's fixed points the block iteration's)."""
    k, p, r, b = 40, 50, 6, 12
    Z = _spectrum_factor(3, k, p, [1.5 ** -i for i in range(30)])
    lam, X = torch.linalg.eigh(Z @ Z.mT)
    Q = X.flip(-1)[..., :b]
    th, Q1, _ = topr.block_step(Z, Q, r)
    assert _projector_gap(Q1[..., :r], Q[..., :r]) <= 1e-12
    assert torch.allclose(th, lam.flip(-1)[:, :b], rtol=1e-12, atol=1e-14)


def test_filter_degree_is_the_smallest_that_damps_enough():
    """Known answers: x = 2 theta_r / theta_b - 1 = 3 needs acosh(1/damping) / acosh(3)
    = 7.6009 / 1.7627 = 4.31, so degree 5 for damping 1e-3; a wide gap needs 1, a flat one
    is capped; a zero theta_b (rank-deficient M) is clamped to rounding, not divided by."""
    theta = torch.tensor([[4.0, 2.0, 1.5, 1.0],                  # x = 3
                          [1e6, 1e6, 1.0, 1.0],                  # x ~ 2e6: one degree
                          [1.0, 1.0, 0.9999, 0.9999],            # x ~ 1: capped
                          [3.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    d, need = topr.filter_degree(theta, 2, 1e-3, 16)
    assert d.tolist() == [5, 1, 16, 1] and need[2] > 16
    assert topr.filter_degree(theta[:1], 2, 1e-2, 16)[0].tolist() == [4]     # acosh(100) / acosh(3) = 3.0
    # the range cap: x_1 = 7, x_r = 3, (acosh 7 - acosh 3) = 0.87; log(1e-3 / 2^-23) / 0.87 = 10.4
    capped, _ = topr.filter_degree(torch.tensor([[4.0, 2.0, 1.0]]), 2, 1e-12, 50, eps=2.0 ** -23)
    assert capped.tolist() == [10]


def test_block_step_takes_the_exact_solve_where_the_filter_costs_more():
    """With a budget of no degree at all (every filter costs more than a dense solve) the block
    step returns the exact top-b pairs (degree 0) from any block; with no budget (the GPU's
    policy) it filters."""
    k, p, r, b = 40, 50, 6, 12
    Z = _spectrum_factor(2, k, p, [1.2 ** -i for i in range(30)])
    lam, X = torch.linalg.eigh(Z @ Z.mT)
    Q = torch.linalg.qr(torch.randn(2, k, b, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).Q
    th, Q1, degree = topr.block_step(Z, Q, r, budget=0)
    assert degree.tolist() == [0, 0]
    assert _projector_gap(Q1, X.flip(-1)[..., :b]) <= 1e-12
    assert torch.allclose(th, lam.flip(-1)[:, :b], rtol=1e-12, atol=1e-14)
    assert int(topr.block_step(Z, Q, r, budget=None)[2].min()) >= 1


def test_block_step_refuses_bad_blocks():
    Z = torch.randn(1, 10, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="Q must be"):
        topr.block_step(Z, torch.randn(1, 10, 11, dtype=torch.float64), 2)      # b > k
    with pytest.raises(ValueError, match="Q must be"):
        topr.block_step(Z, torch.randn(1, 10, 3, dtype=torch.float64), 4)       # r > b


def test_block_width():
    """r + r columns up to 32, at least r + 8, never more than the space."""
    assert [topr.block_width(1000, r) for r in (1, 8, 16, 24, 32)] == [9, 16, 32, 32, 40]
    assert topr.block_width(20, 16) == 20


@pytest.mark.parametrize("L,T,rb,p,k", [(1, 1, 1, 1, 5), (2, 3, 4, 2, 7), (3, 5, 2, 6, 9), (1, 8, 16, 16, 129)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_block_images_are_the_formed_images(L, T, rb, p, k, dtype):
    """``BlockImages`` products, rows and formed matrix against ``Z`` formed block by block in
    float64 (``p`` below, at and above ``rb``; one adapter; one column)."""
    g = torch.Generator().manual_seed(L * 1000 + T * 10 + p)
    Rx = torch.randn(L, k, T * rb, generator=g, dtype=torch.float64)
    Y = torch.randn(L, T, rb, p, generator=g, dtype=torch.float64)
    Z = torch.cat([Rx[:, :, t * rb:(t + 1) * rb] @ Y[:, t] for t in range(T)], -1)      # [L, k, T p]
    op = topr.BlockImages(Rx.to(dtype), Y.to(dtype))
    X = torch.randn(L, k, 3, generator=g, dtype=torch.float64)
    W = torch.randn(L, T * p, 3, generator=g, dtype=torch.float64)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert op.shape == Z.shape and op.width == T * rb
    assert relerr(op.dense().double(), Z) <= tol
    assert relerr(topr.t_mul(op, X.to(dtype)).double(), Z.mT @ X) <= tol
    assert relerr((op @ W.to(dtype)).double(), Z @ W) <= tol
    assert relerr(op[L - 1:].dense().double(), Z[L - 1:]) <= tol


def test_block_step_on_block_images_is_the_formed_step():
    """One block step on ``BlockImages`` against the same step on the formed ``Z``: the same
    Ritz values and block to rounding, with the filter and with the exact fallback."""
    g = torch.Generator().manual_seed(5)
    L, k, T, rb, p = 3, 40, 6, 4, 4
    op = topr.BlockImages(torch.randn(L, k, T * rb, generator=g, dtype=torch.float64),
                          torch.randn(L, T, rb, p, generator=g, dtype=torch.float64))
    Q0 = torch.linalg.qr(torch.randn(L, k, 12, generator=g, dtype=torch.float64)).Q
    for budget in (None, 0):
        th, Q, deg = topr.block_step(op, Q0, 6, budget=budget)
        th0, Q1, deg0 = topr.block_step(op.dense(), Q0, 6, budget=budget)
        assert torch.equal(deg, deg0) and relerr(th, th0) <= 1e-12
        assert relerr(Q[..., :6] @ Q[..., :6].mT, Q1[..., :6] @ Q1[..., :6].mT) <= 1e-10


@pytest.mark.parametrize("T,rb,r", [(1, 3, 2), (4, 5, 6), (7, 8, 16), (2, 3, 8)], ids=lambda v: str(v))
def test_hosvd_from_the_gram_is_the_formed_hosvd(T, rb, r, monkeypatch):
    """The HOSVD start from ``Z^T Z = S G S`` (the side's Gram, Cholesky whitening, dense solve)
    against the top-r eigenvectors of ``Z Z^T`` with ``Z`` formed: the same subspace (by
    projectors), the same null columns where the layer spans fewer than r directions (T = 2,
    rb = 3, r = 8)."""
    g = torch.Generator().manual_seed(T * 10 + rb)
    L, m, R = 2, 80, T * rb
    F = torch.randn(L, m, R, generator=g, dtype=torch.float64) * torch.logspace(0, -2, R, dtype=torch.float64)
    side = engine._whiten_inner(gram_rows(F.mT), T, engine.WHITEN_RTOL[torch.float64])
    other = torch.randn(L, T, rb, rb + 2, generator=g, dtype=torch.float64)
    blocks_other = other @ other.mT                                   # [L, T, rb, rb], positive definite
    c = torch.rand(L, T, generator=g, dtype=torch.float64) + 0.5
    used = []
    from_gram = engine._hosvd_from_gram
    monkeypatch.setattr(engine, "_hosvd_from_gram", lambda *a: used.append(1) or from_gram(*a))
    U = engine._hosvd(side, blocks_other, c, r, engine.DEFAULT_SOLVER)
    assert used == [1]
    lam, Q = torch.linalg.eigh(blocks_other)
    root = (Q * lam.sqrt()[..., None, :]) @ Q.mT * c[:, :, None, None]
    Z = torch.cat([side.Rf[:, :, t * rb:(t + 1) * rb] @ root[:, t] for t in range(T)], -1)
    w, V = torch.linalg.eigh(Z @ Z.mT)
    V = V.flip(-1)[..., :r] * (w.flip(-1)[:, :r] > 1e-12 * w[:, -1:])[:, None, :]
    assert torch.equal(U.norm(dim=-2) > 0.5, V.norm(dim=-2) > 0.5)
    assert relerr(U @ U.mT, V @ V.mT) <= 1e-10
