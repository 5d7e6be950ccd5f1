"""The fast path (Gram route, coefficient space) against the float64 dense reference."""
from __future__ import annotations

import pytest
import torch

import ctm_kernels as ck
from ctm_kernels import reference as ref
from ctm_kernels.rules import RULES

from adapters import gaussian, relerr, structured
from tolerances import MERGE_RTOL

TIGHT = dict(stop="subspace", tol=1e-11, max_iter=20000)
RULE_PARAMS = {"ties": dict(top_k=0.3), "dare": dict(p=0.3, seed=7), "dare_ties": dict(p=0.3, seed=7, top_k=0.5)}


def _case(name, dtype):
    """(A, B, scales, rank) for the named situation."""
    if name == "gaussian":
        A, B = gaussian(40, 36, [4, 4, 4, 4], dtype=dtype, seed=1)
        return A, B, [0.5, 1.0, 2.0, 1.5], 8
    if name == "structured":
        A, B = structured(48, 40, [5, 5, 5, 5, 5], dtype=dtype, seed=2)
        return A, B, [1.0, 0.7, 1.3, 1.0, 0.9], 9
    if name == "T1":
        A, B = structured(30, 26, [6], dtype=dtype, seed=3)
        return A, B, [2.0], 4
    if name == "mixed_ranks":
        A, B = structured(44, 52, [2, 7, 4], dtype=dtype, seed=4)
        return A, B, [4.0, 1.0, 2.0], 7
    if name == "R_gt_m":
        A, B = structured(20, 22, [6, 6, 6, 6, 6], dtype=dtype, seed=5)   # R = 30 > min(m, n)
        return A, B, [1.0] * 5, 7
    if name == "zero_adapter":
        A, B = structured(32, 30, [4, 4, 4, 4], dtype=dtype, seed=6)
        B[2] = torch.zeros_like(B[2])
        return A, B, [1.0] * 4, 6
    if name == "near_duplicate":
        A, B = structured(36, 34, [4, 4, 4, 4], dtype=dtype, seed=7)
        A[1] = (A[0].double() * (1 + 1e-4) + 1e-4 * torch.randn(A[0].shape, dtype=torch.float64,
                generator=torch.Generator().manual_seed(0))).to(dtype)
        B[1] = B[0].clone()
        return A, B, [1.0] * 4, 6
    if name == "rank_deficient":
        # every adapter has rank 2 in rank-4 factors; together they span 6 < rank = 8
        g = torch.Generator().manual_seed(8)
        basis_b = torch.randn(28, 3, generator=g, dtype=torch.float64)
        basis_a = torch.randn(3, 31, generator=g, dtype=torch.float64)
        A = [(torch.randn(4, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 3, generator=g,
              dtype=torch.float64) @ basis_a).to(dtype) for _ in range(3)]
        B = [(basis_b @ torch.randn(3, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 4, generator=g,
              dtype=torch.float64)).to(dtype) for _ in range(3)]
        return A, B, [1.0] * 3, 8
    raise KeyError(name)


CASES = ["gaussian", "structured", "T1", "mixed_ranks", "R_gt_m", "zero_adapter", "near_duplicate", "rank_deficient"]


def _rule_ok(method, T, rank):
    return not (method == "iso_cts" and T >= rank)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", sorted(RULES))
def test_fast_path_matches_reference(method, case, dtype):
    A, B, scales, rank = _case(case, dtype)
    if not _rule_ok(method, len(A), rank):
        with pytest.raises(ValueError, match="iso_cts needs fewer adapters"):
            ck.merge_layer(A, B, rank=rank, method=method, scales=scales)
        return
    params = RULE_PARAMS.get(method, {})
    dWs = ref.dense_updates([a.double() for a in A], [b.double() for b in B], scales)
    want = ref.ctm(dWs, rank, method, **TIGHT, **params).dW
    out = ck.merge_layer(A, B, rank=rank, method=method, scales=scales, **TIGHT, **params)
    assert out.A.shape == (rank, A[0].shape[1]) and out.B.shape == (B[0].shape[0], rank)
    assert out.A.dtype == dtype and out.B.dtype == dtype
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    assert relerr(out.B @ out.A, want) <= MERGE_RTOL[dtype]
    assert out.info.converged


@pytest.mark.parametrize("case", ["gaussian", "structured", "mixed_ranks"])
def test_plain_hooi_follows_the_reference_iteration(case):
    """accelerate=False takes the reference's steps: same iteration count, same answer at the
    default tol (where the answer still depends on the path)."""
    A, B, scales, rank = _case(case, torch.float64)
    dWs = ref.dense_updates(A, B, scales)
    want = ref.ctm(dWs, rank, "ties")
    out = ck.merge_layer(A, B, rank=rank, method="ties", scales=scales, accelerate=False)
    assert out.info.iterations == want.iterations
    assert relerr(out.B @ out.A, want.dW) <= 1e-8


@pytest.mark.parametrize("case", ["gaussian", "structured"])
def test_acceleration_keeps_the_fixed_point(case):
    """Anderson acceleration needs fewer sweeps and stops at least as close to the converged
    subspace as plain HOOI with the same tol."""
    A, B, scales, rank = _case(case, torch.float64)
    dWs = ref.dense_updates(A, B, scales)
    conv = ref.ctm(dWs, rank, "sum", **TIGHT)
    plain = ck.merge_layer(A, B, rank=rank, method="sum", scales=scales, stop="subspace", tol=1e-5, accelerate=False)
    fast = ck.merge_layer(A, B, rank=rank, method="sum", scales=scales, stop="subspace", tol=1e-5)
    assert fast.info.iterations < plain.info.iterations
    assert relerr(fast.B @ fast.A, conv.dW) <= 3 * relerr(plain.B @ plain.A, conv.dW) + 1e-9


def test_layer_answer_does_not_depend_on_its_batch():
    """A layer that converges at once and one that takes many sweeps, in one batch: each takes
    the sweeps and gives the answer it has alone (frozen layers are no longer computed, and a
    block step's filter degree is each layer's own)."""
    easy = structured(40, 36, [4, 4, 4], seed=30)
    hard = gaussian(40, 36, [4, 4, 4], seed=31)
    outs = ck.merge_layers([(*easy, None), (*hard, None)], rank=6, method="ties")
    for (A, B), got in zip((easy, hard), outs):
        alone = ck.merge_layer(A, B, rank=6, method="ties")
        assert got.info.iterations == alone.info.iterations
        assert relerr(got.B @ got.A, alone.B @ alone.A) <= 1e-8   # rounding of batched BLAS only
    assert outs[0].info.iterations != outs[1].info.iterations


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(dtype):
    A, B, scales, rank = _case("structured", dtype)
    dWs = ref.dense_updates([a.double() for a in A], [b.double() for b in B], scales)
    want = ref.ctm(dWs, rank, "ties", **TIGHT, top_k=0.3).dW
    out = ck.merge_layer(A, B, rank=rank, method="ties", scales=scales, top_k=0.3, **TIGHT)
    assert out.A.dtype == dtype and out.B.dtype == dtype
    assert relerr(out.B.double() @ out.A.double(), want) <= MERGE_RTOL[dtype]


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_beta_and_weights(beta):
    A, B, scales, rank = _case("structured", torch.float64)
    weights = [1.0, 0.5, 2.0, 1.0, 0.25]
    dWs = ref.dense_updates(A, B, scales, weights)
    want = ref.ctm(dWs, rank, "iso_c", beta=beta, scale=0.8, **TIGHT).dW
    out = ck.merge_layer(A, B, rank=rank, method="iso_c", beta=beta, scale=0.8, scales=scales,
                         weights=weights, **TIGHT)
    assert relerr(out.B @ out.A, want) <= 1e-6


def test_plan_remerges_without_new_subspace():
    A, B, scales, rank = _case("gaussian", torch.float64)
    plan = ck.prepare(A, B, rank=rank, scales=scales, **TIGHT)
    for method, scale, params in [("ties", 0.7, dict(top_k=0.4)), ("sum", 1.3, {}), ("dare", 1.0, dict(p=0.2, seed=3))]:
        got = plan.merge(method, scale=scale, **params)
        direct = ck.merge_layer(A, B, rank=rank, method=method, scale=scale, scales=scales, **TIGHT, **params)
        assert torch.equal(got.B @ got.A, direct.B @ direct.A)
    assert plan.coordinates.shape == (len(A), rank, rank)


def test_negative_and_zero_scale():
    A, B, scales, rank = _case("structured", torch.float64)
    plan = ck.prepare(A, B, rank=rank, scales=scales)
    pos = plan.merge("sum", scale=2.0)
    neg = plan.merge("sum", scale=-2.0)
    zero = plan.merge("sum", scale=0.0)
    assert relerr(neg.B @ neg.A, -(pos.B @ pos.A)) <= 1e-12
    assert torch.count_nonzero(zero.B @ zero.A) == 0


def test_all_zero_adapters_give_zero_factors():
    A, B, _, rank = _case("structured", torch.float64)
    B = [torch.zeros_like(b) for b in B]
    out = ck.merge_layer(A, B, rank=rank, method="ties")
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    assert torch.count_nonzero(out.B @ out.A) == 0


def test_batched_layers_equal_single_layers():
    layers = []
    for seed in range(3):
        A, B = structured(40, 36, [4, 6, 4], seed=10 + seed)
        layers.append((A, B, [1.0, 2.0, 0.5]))
    A, B = structured(24, 36, [4, 4], seed=20)                      # another shape: its own group
    layers.append((A, B, [1.0, 1.0]))
    outs = ck.merge_layers(layers, rank=5, method="dare_ties", p=0.2, seed=11, **TIGHT)
    for i, (A, B, s) in enumerate(layers):
        single = ck.merge_layer(A, B, rank=5, method="dare_ties", p=0.2, seed=11, scales=s, **TIGHT)
        if i == 0:  # layer 0 draws the same DARE masks alone and in a batch
            assert relerr(outs[i].B @ outs[i].A, single.B @ single.A) <= 1e-9
        dWs = ref.dense_updates(A, B, s)
        want = ref.ctm(dWs, 5, "sum", **TIGHT).dW
        got = ck.merge_layers([(A, B, s)], rank=5, method="sum", **TIGHT)[0]
        assert relerr(got.B @ got.A, want) <= 1e-6


def test_energy_kept_is_a_share():
    A, B, scales, rank = _case("structured", torch.float64)
    out = ck.merge_layer(A, B, rank=rank, scales=scales, **TIGHT)
    dWs = ref.dense_updates(A, B, scales)
    res = ref.ctm(dWs, rank, "ties", **TIGHT)
    want = (res.C ** 2).sum((-2, -1)) / (dWs ** 2).sum((-2, -1))
    assert torch.allclose(torch.tensor(out.info.energy_kept, dtype=torch.float64), want, atol=1e-8)
    full = ck.merge_layer(A, B, rank=min(sum(a.shape[0] for a in A), 40), scales=scales)
    assert min(full.info.energy_kept) > 1 - 1e-8


def test_sum_at_full_rank_is_exact():
    """With rank >= the adapters' joint rank, CtM + sum reproduces the summed update exactly."""
    A, B = gaussian(50, 45, [3, 5, 4], seed=3)
    dWs = ref.dense_updates(A, B, [1.0, 0.5, 2.0])
    out = ck.merge_layer(A, B, rank=12, method="sum", scales=[1.0, 0.5, 2.0])
    assert relerr(out.B @ out.A, dWs.sum(0)) <= 1e-10


def test_output_factors_are_balanced_and_canonical():
    A, B, scales, rank = _case("structured", torch.float64)
    out = ck.merge_layer(A, B, rank=rank, scales=scales, method="ties", **TIGHT)
    # balanced: B^T B == A A^T (both S)
    assert torch.allclose(out.B.mT @ out.B, out.A @ out.A.mT, atol=1e-8 * out.A.norm() ** 2)
    # canonical signs: the largest-|entry| of each nonzero column of B is positive
    col_max = out.B.gather(0, out.B.abs().argmax(0, keepdim=True))
    assert (col_max[out.B.abs().amax(0, keepdim=True) > 0] > 0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=1000), "rank 1000 exceeds min"),
    (dict(method="nope"), "unknown merge method 'nope'"),
    (dict(method="ties", top_k=1.5), "top_k=1.5 is invalid"),
    (dict(method="sum", top_k=0.5), "takes no parameter 'top_k'"),
    (dict(tol=-1.0), "tol must be a positive number"),
    (dict(beta=2.0), "beta must be in"),
    (dict(scales=[1.0, 2.0]), "scales has 2 entries for 4 adapters"),
    (dict(weights=[1.0, float("nan"), 1.0, 1.0]), "adapter 1: weight is nan"),
], ids=["rank0", "rank_too_big", "unknown_method", "bad_top_k", "unknown_param", "bad_tol", "bad_beta",
        "scales_len", "nan_weight"])
def test_bad_arguments(bad, match):
    A, B, _, _ = _case("gaussian", torch.float64)
    kwargs = dict(rank=4, method="ties") | bad
    with pytest.raises(ValueError, match=match):
        ck.merge_layer(A, B, **kwargs)


@pytest.mark.parametrize("mutate, match", [
    (lambda A, B: B.__setitem__(2, torch.randn(41, 4, dtype=torch.float64)), "adapter 2: update is 41x36"),
    (lambda A, B: A.__setitem__(1, torch.randn(3, 36, dtype=torch.float64)), "adapter 1: lora_A has rank 3 but lora_B has rank 4"),
    (lambda A, B: A[3].__setitem__((0, 0), float("nan")), "adapter 3: lora_A contains NaN or Inf"),
    (lambda A, B: B[0].__setitem__((1, 1), float("inf")), "adapter 0: lora_B contains NaN or Inf"),
    (lambda A, B: A.pop(), "3 lora_A factors but 4 lora_B factors"),
], ids=["shape_mismatch", "rank_mismatch", "nan_in_A", "inf_in_B", "count_mismatch"])
def test_bad_factors_name_the_adapter(mutate, match):
    A, B, _, _ = _case("gaussian", torch.float64)
    mutate(A, B)
    with pytest.raises(ValueError, match=match):
        ck.merge_layer(A, B, rank=4)


def test_merge_layers_names_the_layer():
    A, B = gaussian(20, 20, [2, 2], seed=0)
    A2, B2 = gaussian(20, 20, [2, 2], seed=1)
    A2[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 1: adapter 1: lora_A contains NaN"):
        ck.merge_layers([(A, B), (A2, B2)], rank=2)


@pytest.mark.parametrize("case", ["gaussian", "structured", "R_gt_m", "mixed_ranks", "rank_deficient",
                                  "near_duplicate", "zero_adapter", "wide_gaussian", "wide_structured"])
def test_factored_top_r_route_matches_reference(case, monkeypatch):
    """Every HOSVD and exact HOOI eigensolve (plain HOOI, ``accelerate=False``) on the factored
    block Krylov route (ops/topr.py) gives the reference answer at tight tol, in the same number
    of sweeps as the dense route. (With
    a guard of 4; whitened sizes below two blocks are solved densely by that route, the
    ``wide`` cases are large enough for Krylov steps.)"""
    from ctm_kernels import engine
    from ctm_kernels.ops import topr
    if case == "wide_gaussian":
        A, B = gaussian(50, 48, [4] * 10, seed=13)
        scales, rank = [1.0] * 10, 6
    elif case == "wide_structured":
        A, B = structured(60, 56, [4] * 12, seed=14)
        scales, rank = [1.0] * 12, 6
    else:
        A, B, scales, rank = _case(case, torch.float64)
    dWs = ref.dense_updates(A, B, scales)
    want = ref.ctm(dWs, rank, "ties", **TIGHT, top_k=0.3).dW
    dense = ck.merge_layer(A, B, rank=rank, method="ties", scales=scales, top_k=0.3, accelerate=False,
                           solver=engine.SolverSettings(exact_route="dense"), **TIGHT)
    steps, solve = [], topr.top_r_factored
    monkeypatch.setattr(topr, "top_r_factored", lambda *a, **k: (lambda res: steps.append(int(res[2].max())) or res)(solve(*a, **k)))
    out = ck.merge_layer(A, B, rank=rank, method="ties", scales=scales, top_k=0.3, accelerate=False,
                         solver=engine.SolverSettings(exact_route="factored", factored_guard=4), **TIGHT)
    assert out.info.converged
    assert relerr(out.B @ out.A, want) <= 1e-6
    assert abs(out.info.iterations - dense.info.iterations) <= 1
    if case.startswith("wide"):
        assert min(steps) >= 1


def test_many_adapters_outer_whitening_matches_reference():
    """R = 96 > m = 24, n = 20: both sides whitened from their small outer Grams."""
    A, B = structured(24, 20, [4] * 24, seed=9)
    dWs = ref.dense_updates(A, B)
    want = ref.ctm(dWs, 6, "sum", **TIGHT).dW
    out = ck.merge_layer(A, B, rank=6, method="sum", **TIGHT)
    assert relerr(out.B @ out.A, want) <= 1e-6


def test_reference_backend_is_the_reference(monkeypatch):
    A, B, scales, rank = _case("structured", torch.float64)
    dWs = ref.dense_updates(A, B, scales)
    want = ref.ctm(dWs, rank, "ties", top_k=0.3)
    out = ck.merge_layer(A, B, rank=rank, method="ties", top_k=0.3, scales=scales, backend="reference")
    assert out.info.iterations == want.iterations
    assert torch.equal(out.B @ out.A, want.B @ want.A)
    monkeypatch.setenv("CTM_KERNELS_BACKEND", "reference")
    again = ck.merge_layer(A, B, rank=rank, method="ties", top_k=0.3, scales=scales)
    assert torch.equal(again.B @ again.A, want.B @ want.A)


def test_unavailable_backend_raises(monkeypatch):
    A, B, scales, rank = _case("structured", torch.float64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu"):
        ck.merge_layer(A, B, rank=rank, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ck.merge_layer(A, B, rank=rank, backend="cuda-magic")


@pytest.mark.slow
def test_many_adapters_at_scale_matches_reference():
    """T = 48 adapters of rank 8 on a 160 x 144 layer (R = 384 > m, n): outer-Gram whitening on
    both sides, against the dense fp64 reference at tight tol, with TIES."""
    A, B = structured(160, 144, [8] * 48, seed=12)
    dWs = ref.dense_updates(A, B)
    want = ref.ctm(dWs, 8, "ties", stop="subspace", tol=1e-10, max_iter=5000).dW
    out = ck.merge_layer(A, B, rank=8, method="ties", stop="subspace", tol=1e-10, max_iter=5000)
    assert relerr(out.B @ out.A, want) <= 1e-6


@pytest.mark.slow
def test_accelerator_falls_back_when_it_stalls():
    """Gaussian adapters, R > m: the extrapolation oscillated here until the stall guard made
    the layer continue with plain HOOI; it must converge to the reference's fixed point."""
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(16, 256, generator=g) / 16 for _ in range(64)]
    B = [torch.randn(256, 16, generator=g) / 16 for _ in range(64)]
    want = ref.ctm(ref.dense_updates(A, B), 16, "sum", stop="subspace", tol=1e-9, max_iter=3000)
    out = ck.merge_layer(A, B, rank=16, method="sum", stop="subspace", tol=1e-9, max_iter=3000)
    assert out.info.converged
    assert relerr(out.B.double() @ out.A.double(), want.dW) <= 1e-6


# ------------------------------------------------------------------------------------------
# what users rely on, through the public API whatever solver runs underneath


def _deficient(kind, dtype):
    """(A, B, scales, rank 8) of three rank-4 adapters whose updates span fewer than 8 directions.
    ``factors``: rank-deficient factors (every A_t and B_t inside one 3-dimensional subspace per
    side: the Grams are singular, the data spans 3 directions). ``updates``: full-rank B_t (the
    Gram of B is regular) and rank-2 A_t, so the updates span 6 directions on each side while
    the B factors span 12."""
    if kind == "factors":
        return _case("rank_deficient", dtype)
    g = torch.Generator().manual_seed(9)
    B = [torch.randn(28, 4, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    A = [(torch.randn(4, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 31, generator=g, dtype=torch.float64)
          ).to(dtype) for _ in range(3)]
    return A, B, [1.0, 0.5, 2.0], 8


@pytest.mark.parametrize("backend", [None, "reference"], ids=["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ["factors", "updates"], ids=["deficient-factors", "deficient-updates"])
def test_bases_have_zero_columns_beyond_the_directions_the_adapters_span(kind, dtype, backend):
    """At a rank above the number of directions the updates span (3 or 6 of 8, see ``_deficient``),
    the bases' first columns are orthonormal and the others zero (never arbitrary vectors), and the
    merged update is the exact sum."""
    A, B, scales, rank = _deficient(kind, dtype)
    dWs = ref.dense_updates(A, B, scales)
    # (fp32 factors carry rounding-level directions, below every cut-off: not counted)
    spans = [int(torch.linalg.matrix_rank(torch.cat(list(dWs), d), rtol=1e-5)) for d in (1, 0)]
    assert spans == ([3, 3] if kind == "factors" else [6, 6]) and rank == 8
    plan = ck.prepare(A, B, rank=rank, scales=scales, backend=backend)
    for X, k in zip(plan.bases(), spans):
        assert X.shape[-1] == rank
        assert torch.count_nonzero(X[:, k:]) == 0, X[:, k:].abs().amax(0)
        assert torch.allclose(X[:, :k].double().mT @ X[:, :k].double(), torch.eye(k, dtype=torch.float64), atol=1e-10)
    out = plan.merge("sum")
    assert relerr(out.B @ out.A, dWs.sum(0)) <= MERGE_RTOL[dtype]


SCALE_CASES = ["mixed_ranks", "deficient_updates", "near_duplicate", "R_gt_m"]


@pytest.mark.parametrize("side", ["B", "A"])
@pytest.mark.parametrize("c", [1e-8, 1e8], ids=["c1e-8", "c1e8"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", SCALE_CASES)
def test_merge_of_scaled_factors_is_the_scaled_merge(case, dtype, c, side):
    """merge(c B) == merge(c A) == c merge(B, A): every cut-off (whitening, Cholesky pivots, null
    directions, the stop test) is relative, so a tiny or huge adapter set merges like a unit one.
    The cases take every whitening route (Cholesky, eigendecomposition of a singular Gram, the
    outer Gram of R > m). ``c B`` rounds in fp32, hence the fp32 bound."""
    A, B, scales, rank = _deficient("updates", dtype) if case == "deficient_updates" else _case(case, dtype)
    kw = dict(rank=rank, scales=scales, method="ties", top_k=0.5, **TIGHT)
    base = ck.merge_layer(A, B, **kw)
    scale = lambda X: [(c * x.double()).to(dtype) for x in X]     # noqa: E731
    scaled = ck.merge_layer(A, scale(B), **kw) if side == "B" else ck.merge_layer(scale(A), B, **kw)
    want = c * (base.B.double() @ base.A.double())
    assert scaled.B.dtype == dtype
    assert relerr(scaled.B.double() @ scaled.A.double(), want) <= {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]


@pytest.mark.parametrize("m, n", [(12, 20), (20, 12)], ids=["wide", "tall"])
def test_rank_above_min_m_n_is_refused(m, n):
    """A rank above ``min(m, n)`` has no orthonormal basis on the short side: refused naming both,
    whichever side is short; ``min(m, n)`` itself merges."""
    A, B = gaussian(m, n, [4, 4], seed=5)
    with pytest.raises(ValueError, match=rf"rank 13 exceeds min\(m, n\) = 12 of the {m}x{n} layer"):
        ck.merge_layer(A, B, rank=13)
    with pytest.raises(ValueError, match=r"layer 0: rank 13 exceeds min\(m, n\) = 12"):
        ck.prepare_layers([(A, B)], rank=13)
    assert ck.merge_layer(A, B, rank=12, method="sum").B.shape == (m, 12)


def test_bases_are_orthonormal_whatever_the_adapters_scales():
    """``PreparedLayer.bases()`` spans the scaled updates: orthonormal columns with ``U^T dW_t V`` the
    coordinates, for adapters with unequal scales and weights."""
    A, B, scales, rank = _case("mixed_ranks", torch.float64)
    plan = ck.prepare(A, B, rank=rank, scales=scales, weights=[0.5, 2.0, 1.0])
    U, V = plan.bases()
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(U.mT @ U, eye, atol=1e-10) and torch.allclose(V.mT @ V, eye, atol=1e-10)
    dWs = ref.dense_updates(A, B, scales, [0.5, 2.0, 1.0])
    assert torch.allclose(U.mT @ dWs @ V, plan.coordinates, atol=1e-10)


def test_same_shape_layers_of_different_dtypes_keep_their_own_dtype():
    """``merge_layers`` batches layers of one shape only when their dtypes agree: a float32 and a
    bfloat16 layer of the same shape each come back in their own dtype, as merged alone."""
    A, B = gaussian(24, 20, [3, 3], seed=6)
    layers = [([a.float() for a in A], [b.float() for b in B]), ([a.bfloat16() for a in A], [b.bfloat16() for b in B])]
    outs = ck.merge_layers(layers, rank=4, method="sum")
    for (Al, Bl), out in zip(layers, outs, strict=True):
        alone = ck.merge_layer(Al, Bl, rank=4, method="sum")
        assert out.A.dtype == out.B.dtype == Al[0].dtype
        assert torch.equal(out.A, alone.A) and torch.equal(out.B, alone.B)
