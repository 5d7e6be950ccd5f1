"""The ops' torch paths against float64 formulas written out per adapter, their argument
checks, the eigensolvers of ops.eig and the backend choice."""
from __future__ import annotations

import logging

import pytest
import torch

from ctm_kernels import backend
from ctm_kernels.ops import eig, gram, lift, project
from op_checks import assert_close

# (L, m, R, n): R not a multiple of any block, L = 1, m and n not powers of two, R > m
SHAPES = [(1, 1, 1, 1), (1, 7, 5, 3), (3, 33, 20, 17), (2, 9, 24, 40)]
SHAPE_IDS = [f"L{s[0]}-m{s[1]}-R{s[2]}-n{s[3]}" for s in SHAPES]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def factors(L, m, R, n, dtype, seed=0):
    g = _gen(seed)
    B = torch.randn((L, m, R), generator=g).to(dtype)
    A = torch.randn((L, R, n), generator=g).to(dtype)
    s = torch.rand((L, R), generator=g) + 0.5
    return B, A, s


def ref_gram(B, A, s):
    G_B = torch.stack([(B[l].double() * s[l].double()).T @ (B[l].double() * s[l].double()) for l in range(B.shape[0])])
    G_A = torch.stack([A[l].double() @ A[l].double().T for l in range(A.shape[0])])
    return G_B, G_A


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gram_torch_matches_per_layer_formula(shape, dtype):
    B, A, s = factors(*shape, dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    G_B, G_A = gram.gram(B, A, s, backend="torch")
    rB, rA = ref_gram(B, A, s)
    assert G_B.dtype == out_dtype and G_A.dtype == out_dtype
    assert_close(G_B, rB, out_dtype, what="G_B")
    assert_close(G_A, rA, out_dtype, what="G_A")


def test_gram_without_scale_and_fp64_accumulation():
    B, A, _ = factors(2, 11, 6, 13, torch.bfloat16)
    G_B, G_A = gram.gram(B, A, None, out_dtype=torch.float64, backend="torch")
    rB, rA = ref_gram(B, A, torch.ones(2, 6))
    assert G_B.dtype == torch.float64
    assert_close(G_B, rB, torch.float64, what="G_B")
    assert_close(G_A, rA, torch.float64, what="G_A")


def ref_project(G_B, G_A, Phi, Psi, T):
    L, R, r = Phi.shape
    rb = R // T
    out = torch.empty((L, T, r, r), dtype=torch.float64)
    for l in range(L):
        for t in range(T):
            blk = slice(t * rb, (t + 1) * rb)
            out[l, t] = (Phi[l].double().T @ G_B[l, :, blk].double()) @ (G_A[l, blk, :].double() @ Psi[l].double())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("L,T,rb,r", [(1, 1, 1, 1), (2, 3, 5, 1), (1, 4, 7, 3), (3, 5, 4, 6)],
                         ids=["all-ones", "r1", "L1-odd", "r-gt-rb"])
def test_project_torch_matches_blockwise_formula(L, T, rb, r, dtype):
    g = _gen(1)
    R = T * rb
    G_B, G_A, Phi, Psi = (torch.randn(s, generator=g, dtype=dtype) for s in [(L, R, R), (L, R, R), (L, R, r), (L, R, r)])
    C = project.project(G_B, G_A, Phi, Psi, T, backend="torch")
    assert C.dtype == dtype
    assert_close(C, ref_project(G_B, G_A, Phi, Psi, T), dtype, what="C")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_lift_torch_matches_formula(shape, out_dtype):
    L, m, R, n = shape
    B, A, s = factors(L, m, R, n, torch.bfloat16)
    g = _gen(2)
    r = 3
    left = torch.randn((L, R, r), generator=g, dtype=torch.float64)
    right = torch.randn((L, r, R), generator=g, dtype=torch.float64)
    Bo, Ao = lift.lift(B, A, s, left, right, out_dtype, backend="torch")
    rB = (B.double() * s.double()[:, None, :]) @ left
    rA = right @ A.double()
    assert Bo.dtype == out_dtype and Ao.dtype == out_dtype
    assert_close(Bo, rB, out_dtype, what="B_out")
    assert_close(Ao, rA, out_dtype, what="A_out")


@pytest.mark.parametrize("call,match", [
    (lambda: gram.gram(torch.ones(2, 3, 4), torch.ones(2, 5, 6)), "ops.gram: A must be"),
    (lambda: gram.gram(torch.ones(3, 4), torch.ones(2, 4, 6)), "ops.gram: B must have 3 dims"),
    (lambda: gram.gram(torch.ones(2, 3, 4), torch.ones(2, 4, 6), torch.ones(2, 5)), "ops.gram: scale must be"),
    (lambda: gram.gram(torch.ones(1, 3, 4, dtype=torch.int32), torch.ones(1, 4, 6)), "unsupported dtype"),
    (lambda: gram.gram(torch.ones(1, 3, 4), torch.ones(1, 4, 6), precision="tf32"), "precision must be"),
    (lambda: gram.gram(torch.ones(1, 3, 4), torch.ones(1, 4, 6), out_dtype=torch.float16), "out_dtype"),
    (lambda: project.project(*(torch.ones(1, 6, 6),) * 2, *(torch.ones(1, 6, 2),) * 2, 4), "T must be a positive divisor"),
    (lambda: project.project(torch.ones(1, 6, 6), torch.ones(1, 5, 5), *(torch.ones(1, 6, 2),) * 2, 3), "G_B and G_A"),
    (lambda: lift.lift(torch.ones(1, 3, 4), torch.ones(1, 4, 5), None, torch.ones(1, 4, 2, dtype=torch.float64),
                       torch.ones(1, 3, 4, dtype=torch.float64), torch.float32), "right must be"),
    (lambda: lift.lift(torch.ones(1, 3, 4), torch.ones(1, 4, 5), None, torch.ones(1, 4, 2, dtype=torch.float16),
                       torch.ones(1, 2, 4), torch.float32), "left has unsupported dtype"),
    (lambda: gram.gram(torch.ones(1, 3, 4), torch.ones(1, 4, 6), backend="cuda"), "unknown backend"),
], ids=["gram-A-shape", "gram-B-ndim", "gram-scale-shape", "gram-int-dtype", "gram-precision", "gram-out-dtype",
        "project-T", "project-G-shape", "lift-right-shape", "lift-left-dtype", "unknown-backend"])
def test_bad_arguments_raise_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- backend


def test_resolve_defaults_and_env(monkeypatch):
    monkeypatch.delenv("CTM_KERNELS_BACKEND", raising=False)
    assert backend.resolve("cpu") == "torch"
    monkeypatch.setenv("CTM_KERNELS_BACKEND", "reference")
    assert backend.resolve("cpu") == "reference"
    assert backend.resolve("cpu", "torch") == "torch"      # an explicit argument wins over the env
    monkeypatch.setenv("CTM_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backend.resolve("cpu")


def test_resolve_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("CTM_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu"):
        backend.resolve("cpu", "triton")


def test_resolve_cuda_without_triton_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("CTM_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda device: False)
    monkeypatch.setattr(backend, "_logged", set())
    with caplog.at_level(logging.INFO, logger="ctm_kernels"):
        assert backend.resolve("cuda") == "torch"
        assert backend.resolve("cuda") == "torch"
    assert len([r for r in caplog.records if "triton is not importable" in r.getMessage()]) == 1


def test_extension_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CTM_KERNELS_NO_EXT", "1")
    assert backend.extension() is None
    assert not backend.compiled_op("jacobi_eigh", "cpu")
    with pytest.raises(ValueError, match="method='jacobi' needs the compiled ops"):
        eig.eigh_batched(torch.eye(3)[None], method="jacobi")


# --------------------------------------------------------------------------- eig


def psd(L, p, rank, seed, dtype=torch.float64):
    g = _gen(seed)
    Z = torch.randn((L, p, rank), generator=g, dtype=torch.float64)
    # a decaying spectrum, as in the engine's K = Z Z^T
    Z = Z * torch.logspace(0, -2, rank, dtype=torch.float64)
    return (Z @ Z.mT).to(dtype)


def projector_err(Q, Q0):
    return (Q @ Q.mT - Q0 @ Q0.mT).norm(dim=(-2, -1)).max().item()


def test_eigh_batched_lapack_and_topk_order():
    M = psd(3, 10, 10, 0)
    w, Q = eig.eigh_batched(M, method="lapack")
    assert torch.all(w[:, 1:] >= w[:, :-1])
    assert_close(Q @ torch.diag_embed(w) @ Q.mT, M, torch.float64, what="reconstruction")
    wk, Qk = eig.topk_eigh(M, 4)
    assert wk.shape == (3, 4) and Qk.shape == (3, 10, 4)
    assert torch.all(wk[:, :-1] >= wk[:, 1:])
    assert_close(wk, w.flip(-1)[:, :4], torch.float64, what="top-4 eigenvalues")


@pytest.mark.parametrize("k,k0", [(1, 1), (5, 5), (5, 2), (6, 12)], ids=["k1", "k5", "short-start", "long-start"])
def test_subspace_topk_matches_dense(k, k0):
    M = psd(2, 60, 20, 1)
    w0, Q0 = torch.linalg.eigh(M)
    w0, Q0 = w0.flip(-1)[:, :k], Q0.flip(-1)[..., :k]
    g = _gen(3)
    X0 = torch.randn((2, 60, k0), generator=g, dtype=torch.float64)
    w, Q, steps, ok = eig.subspace_topk(M, k, X0, tol=1e-11, max_iter=500)
    assert bool(ok.all()) and int(steps.max()) > 0
    assert_close(w, w0, torch.float32, what="eigenvalues")
    assert projector_err(Q, Q0) < 1e-6
    assert_close(Q.mT @ Q, torch.eye(k, dtype=torch.float64).expand(2, k, k), torch.float64, what="orthonormal")


def test_subspace_warm_start_needs_fewer_steps():
    M = psd(2, 80, 30, 2)
    k = 4
    _, Q0 = torch.linalg.eigh(M)
    Q0 = Q0.flip(-1)[..., :k]
    g = _gen(4)
    cold = eig.subspace_topk(M, k, torch.randn((2, 80, k), generator=g, dtype=torch.float64))[2]
    warm = eig.subspace_topk(M, k, Q0 + 1e-6 * torch.randn(Q0.shape, generator=g, dtype=torch.float64))[2]
    assert int(warm.max()) < int(cold.max())


def _spectrum_case(kind, p, seed, dtype):
    """``[3, p, p]`` symmetric matrices: ``decaying`` (a half-step's ``Z Z^T``), ``padded`` (half
    the rows and columns zero: rank padding with R > m), ``ill`` (eigenvalues 1 down to 1e-12),
    ``indefinite`` (symmetric with negative eigenvalues: the algebraically largest are wanted)."""
    g = _gen(seed)
    if kind == "decaying":
        M = psd(3, p, p // 2, seed)
    elif kind == "padded":
        M = torch.zeros(3, p, p, dtype=torch.float64)
        M[:, : p // 2, : p // 2] = psd(3, p // 2, p // 2, seed)
    elif kind == "ill":
        Q = torch.linalg.qr(torch.randn(3, p, p, generator=g, dtype=torch.float64)).Q
        M = (Q * torch.logspace(0, -12, p, dtype=torch.float64)) @ Q.mT
    else:
        X = torch.randn(3, p, p, generator=g, dtype=torch.float64)
        M = (X + X.mT) / 2
    return ((M + M.mT) / 2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind,p,k", [("decaying", 256, 16), ("decaying", 257, 1), ("decaying", 300, 75),
                                      ("padded", 262, 16), ("ill", 200, 13), ("indefinite", 130, 32)],
                         ids=["p256-k16", "p257-k1", "p300-k75-quarter", "padded-p262", "ill-p200-k13", "indefinite-p130"])
def test_partial_topk_matches_float64_dense(kind, p, k, dtype):
    """LAPACK's partial solver gives the top-k pairs of a float64 full decomposition: eigenvalues
    to rounding of the largest, the top-k subspace by its projector (never raw vectors), every
    entry written (outputs start NaN)."""
    M = _spectrum_case(kind, p, seed=p, dtype=dtype)
    w0, Q0 = torch.linalg.eigh(M.double())
    w0, Q0 = w0.flip(-1)[:, :k], Q0.flip(-1)[..., :k]
    w, Q = eig.topk_eigh(M, k, method="partial")
    assert w.dtype == dtype and Q.shape == (3, p, k) and bool(torch.isfinite(Q).all())
    eps = torch.finfo(dtype).eps
    scale = torch.linalg.eigvalsh(M.double()).abs().amax(-1, keepdim=True)
    assert float(((w.double() - w0).abs() / scale).max()) <= 50 * eps
    # the subspace is defined where the k-th and (k+1)-th eigenvalues part: gap-scaled tolerance
    full = torch.linalg.eigvalsh(M.double()).flip(-1)
    gap = ((full[:, k - 1] - full[:, k]) / scale[:, 0]).min() if k < p else torch.tensor(1.0)
    assert projector_err(Q.double(), Q0) <= 50 * p * eps / float(gap)
    assert_close(Q.double().mT @ Q.double(), torch.eye(k, dtype=torch.float64).expand(3, k, k), dtype,
                 what="orthonormal")


def test_topk_eigh_takes_the_partial_solver_where_it_pays(monkeypatch):
    """Where bench_partial_eigh measured it faster (PARTIAL_P by thread count, k <= p / 16);
    the environment variable forces either route."""
    monkeypatch.delenv("CTM_KERNELS_TOPK_EIGH", raising=False)
    calls = []
    partial = eig.partial_topk
    monkeypatch.setattr(eig, "partial_topk", lambda M, k: calls.append((M.shape[-1], k)) or partial(M, k))
    monkeypatch.setattr(eig, "PARTIAL_P", {1: (256, None), 2: (256, 1024)})
    monkeypatch.setattr(eig, "PARTIAL_MAX_SHARE", 1 / 16)
    threads = torch.get_num_threads()

    def sizes_taken(n_threads, cases):
        torch.set_num_threads(n_threads)
        calls.clear()
        for p, k in cases:
            eig.topk_eigh(psd(1, p, p, 0), k)
        return list(calls)
    try:
        assert sizes_taken(1, [(256, 16), (256, 17), (255, 15), (1024, 64), (64, 4)]) == [(256, 16), (1024, 64)]
        assert sizes_taken(2, [(512, 16), (1024, 16)]) == [(512, 16)]
        assert sizes_taken(3, [(512, 16)]) == []            # not measured with more threads: full
    finally:
        torch.set_num_threads(threads)
    calls.clear()
    monkeypatch.setenv("CTM_KERNELS_TOPK_EIGH", "partial")
    eig.topk_eigh(psd(1, 20, 20, 0), 3)
    monkeypatch.setenv("CTM_KERNELS_TOPK_EIGH", "full")
    eig.topk_eigh(psd(1, 256, 256, 0), 16)
    assert calls == [(20, 3)]
    monkeypatch.setenv("CTM_KERNELS_TOPK_EIGH", "fast")
    with pytest.raises(ValueError, match="CTM_KERNELS_TOPK_EIGH must be 'full' or 'partial'"):
        eig.topk_eigh(psd(1, 20, 20, 0), 3)


def _blas_threads():
    from threadpoolctl import threadpool_info
    return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def test_partial_topk_runs_on_one_blas_thread_and_hands_failures_to_torch(monkeypatch):
    """scipy's OpenBLAS is held to one thread during the solve and given back its count after; a
    layer that LAPACK refuses is solved by torch.linalg.eigh (so errors are torch's), the others
    keep the partial answer."""
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    seen = []
    solve = scipy.linalg.eigh

    def failing_on_second(a, **kw):
        seen.append(max(_blas_threads()))
        if len(seen) == 2:
            raise scipy.linalg.LinAlgError("did not converge")
        return solve(a, **kw)
    monkeypatch.setattr(scipy.linalg, "eigh", failing_on_second)
    M = psd(3, 40, 40, 7)
    with threadpool_limits(2, user_api="blas"):     # two threads outside, even on a one-core machine
        before = _blas_threads()
        w, Q = eig.partial_topk(M, 5)
        assert _blas_threads() == before and max(before) == 2
    assert seen == [1, 1, 1]
    w0, Q0 = eig.topk_eigh(M, 5, method="lapack")
    assert_close(w, w0, torch.float64, what="eigenvalues")
    assert projector_err(Q, Q0) < 1e-10
    monkeypatch.setattr(scipy.linalg, "eigh", solve)
    bad = M.clone()
    bad[1, 2, 3] = bad[1, 3, 2] = float("nan")      # refused by scipy: torch's answer or error
    try:
        want = torch.linalg.eigh(bad[1])
    except torch.linalg.LinAlgError:
        with pytest.raises(torch.linalg.LinAlgError):
            eig.partial_topk(bad, 5)
    else:
        w, _ = eig.partial_topk(bad, 5)
        assert torch.allclose(w[1], want[0].flip(-1)[:5], equal_nan=True)


def _in_two_threads(fn):
    """Runs ``fn()`` in two Python threads at once; returns the exceptions they raised."""
    import threading

    errors = []

    def work():
        try:
            fn()
        except Exception as exc:   # noqa: BLE001 - returned to the caller
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_partial_topk_from_two_threads_leaves_the_blas_thread_count_alone():
    """threadpoolctl's limit is process-wide and restores what it found: overlapping limits from
    two Python threads once left OpenBLAS on one thread for good. Solves take turns."""
    from threadpoolctl import threadpool_limits

    M = psd(2, 48, 48, 3)
    with threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        errors = _in_two_threads(lambda: [eig.partial_topk(M, 4) for _ in range(30)])
        assert not errors and _blas_threads() == before


def test_partial_route_takes_any_batch_shape_and_leaves_autograd_to_the_full_solve(monkeypatch):
    monkeypatch.setenv("CTM_KERNELS_TOPK_EIGH", "partial")
    M = psd(4, 30, 30, 9)
    w0, Q0 = eig.topk_eigh(M, 3, method="lapack")
    for shaped, want in ((M[0], w0[:1]), (M.reshape(2, 2, 30, 30), w0)):
        w, Q = eig.topk_eigh(shaped, 3)
        assert w.shape == shaped.shape[:-2] + (3,) and Q.shape == shaped.shape[:-1] + (3,)
        assert_close(w.reshape(-1, 3), want, torch.float64, what="eigenvalues")
    with pytest.raises(ValueError, match="not differentiable"):
        eig.topk_eigh(M.clone().requires_grad_(), 3)
    monkeypatch.delenv("CTM_KERNELS_TOPK_EIGH")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        G = psd(1, 256, 256, 2).requires_grad_()
        w, _ = eig.topk_eigh(G, 4)              # a size the partial solver takes, but it needs grad
        w.sum().backward()
        assert G.grad is not None and bool(torch.isfinite(G.grad).all())
    finally:
        torch.set_num_threads(threads)


def test_topk_eigh_with_start_falls_back_to_dense_when_not_converged():
    M = psd(3, 40, 15, 5)
    w0, Q0 = eig.topk_eigh(M, 3)
    X0 = torch.randn((3, 40, 3), generator=_gen(6), dtype=torch.float64)
    w, Q = eig.topk_eigh(M, 3, X0=X0, method="subspace", max_iter=0)
    assert_close(w, w0, torch.float64, what="eigenvalues")
    assert projector_err(Q, Q0) < 1e-10


def _separated(p, seed):
    """``[2, p, p]`` symmetric, eigenvalues 1, 0.9, ... (well apart) and some negative ones, in random bases."""
    g = _gen(seed)
    Q = torch.linalg.qr(torch.randn(2, p, p, generator=g, dtype=torch.float64)).Q
    lam = torch.linspace(1.0, -0.5, p, dtype=torch.float64)[torch.randperm(p, generator=g)]
    return (Q * lam) @ Q.mT, lam.sort(descending=True).values


@pytest.mark.parametrize("method", ["partial", "lapack", "jacobi", "auto"])
def test_topk_eigh_pairs_each_eigenvalue_with_its_own_vector(method, monkeypatch):
    """Every route returns pairs: ``M Q = Q diag(w)`` column by column, descending, column 0 the top
    eigenvector (projector checks alone pass on values and vectors in different orders)."""
    monkeypatch.delenv("CTM_KERNELS_TOPK_EIGH", raising=False)
    if method == "jacobi" and not backend.compiled_op("jacobi_eigh", torch.device("cpu")):
        pytest.skip("compiled ops not built")
    for p, k in ((10, 4), (40, 3)):
        M, lam = _separated(p, p)
        w, Q = eig.topk_eigh(M, k, method=method)
        assert torch.allclose(w, lam[:k].expand(2, k), atol=1e-12)
        assert float((M @ Q - Q * w[:, None, :]).norm(dim=-2).max()) < 1e-10
        top = torch.linalg.eigh(M).eigenvectors[..., -1]
        assert bool(((Q[..., 0] * top).sum(-1).abs() > 1 - 1e-10).all())


def test_partial_solves_never_overlap_from_two_threads(monkeypatch):
    """Partial solves take turns (``_blas_lock``): the first solve to enter waits for a second one
    to join it; two threads never find each other inside, whatever the scheduling."""
    import threading

    import scipy.linalg

    solve = scipy.linalg.eigh
    state = {"inside": 0, "most": 0, "entered": 0}
    guard, joined = threading.Lock(), threading.Event()

    def watched(a, **kw):
        with guard:
            state["inside"] += 1
            state["entered"] += 1
            state["most"] = max(state["most"], state["inside"])
            first = state["entered"] == 1
            if not first:
                joined.set()
        if first:
            joined.wait(0.3)            # the lock holds a second solve out: it joins only after this
        try:
            return solve(a, **kw)
        finally:
            with guard:
                state["inside"] -= 1
    monkeypatch.setattr(scipy.linalg, "eigh", watched)
    M = psd(1, 24, 24, 5)
    errors = _in_two_threads(lambda: eig.partial_topk(M, 3))
    assert not errors and state["entered"] == 2 and state["most"] == 1
