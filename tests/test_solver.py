"""The subspace solve (docs/DESIGN.md section 8): the accelerated iteration ends where plain
HOOI ends, the objective never decreases, and the default (energy) stop keeps the energy of
the converged answer. Randomized over ``ctm_kernels.testing.hooi_case`` sets."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import ctm_kernels as ck
from ctm_kernels import engine
from ctm_kernels import reference as ref
from ctm_kernels.testing import hooi_case, total_energy_kept

from adapters import relerr

TIGHT = dict(stop="subspace", tol=1e-10, max_iter=20000)
PROPERTY_CASES = 300
ENERGY_CASES = 100


def _label(i):
    return hooi_case(i).label


def _merge(case, **kw):
    return ck.merge_layer(case.A, case.B, rank=case.rank, method="sum", beta=case.beta, scales=case.scales, **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of small solves: torch's intra-op threads only add overhead here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("index", range(PROPERTY_CASES), ids=_label)
def test_accelerated_solve_ends_where_plain_hooi_ends(index):
    case = hooi_case(index)
    fast = _merge(case, **TIGHT)
    plain = _merge(case, accelerate=False, **TIGHT)
    assert fast.info.converged and plain.info.converged
    assert fast.info.stopped_by == plain.info.stopped_by == "subspace"
    assert relerr(fast.delta, plain.delta) <= 1e-6
    assert fast.info.objective >= plain.info.objective * (1 - 1e-12)


UNFORMED_CASES = 100


@pytest.mark.parametrize("index", range(UNFORMED_CASES), ids=_label)
def test_unformed_images_end_where_the_formed_ones_end(index, monkeypatch):
    """Block half-steps on the images kept as their factors (``ops.topr.BlockImages``, forced
    here from the smallest side on) reach the fixed point of the formed images: the same
    products up to rounding, so the same answer at tight tol; the route is taken wherever
    ``R <= T r`` (padded ``R``)."""
    case = hooi_case(index)
    routes = []
    step = engine.topr_op.block_step
    monkeypatch.setattr(engine.topr_op, "block_step",
                        lambda Z, *a, **k: routes.append(type(Z).__name__) or step(Z, *a, **k))
    unformed = _merge(case, solver=engine.SolverSettings(unformed_min_k=1), **TIGHT)
    taken = set(routes)
    formed = _merge(case, solver=engine.SolverSettings(unformed_min_k=10 ** 9), **TIGHT)
    padded = len(case.ranks) * max(case.ranks)
    assert taken == ({"BlockImages"} if padded <= len(case.ranks) * case.rank else {"Tensor"})
    assert unformed.info.converged and formed.info.converged
    assert relerr(unformed.delta, formed.delta) <= 1e-6
    assert unformed.info.objective == pytest.approx(formed.info.objective, rel=1e-10)


def _seed4_set():
    """Three gaussian rank-8 adapters on a 48 x 96 layer, where an ungated accelerator
    ended at another fixed point (objective 66825 against plain HOOI's 67040)."""
    g = torch.Generator().manual_seed(4)
    A = [torch.randn(8, 96, generator=g, dtype=torch.float64) for _ in range(3)]
    B = [torch.randn(48, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    return A, B


def test_known_wrong_fixed_point_set():
    A, B = _seed4_set()
    fast = ck.merge_layer(A, B, rank=8, method="sum", **TIGHT)
    plain = ck.merge_layer(A, B, rank=8, method="sum", accelerate=False, **TIGHT)
    assert relerr(fast.delta, plain.delta) <= 1e-6
    assert fast.info.iterations < plain.info.iterations / 3     # measured: 79 against 588


def _many_on_small_layer():
    """64 gaussian rank-16 adapters on a 256 x 256 layer (R > m): plain HOOI passes a saddle
    (steps shrink, then grow) before it converges."""
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(16, 256, generator=g, dtype=torch.float64) / 16 for _ in range(64)]
    B = [torch.randn(256, 16, generator=g, dtype=torch.float64) / 16 for _ in range(64)]
    return A, B


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_saddle_set_ends_where_plain_hooi_ends(dtype):
    """Plain HOOI passes a saddle on this set. The block half-steps follow its path only when
    they are accurate enough: with INNER_DAMPING 1e-1 instead of 1e-3 both sets end at other
    fixed points (an ungated Anderson step of an earlier engine ended at 33.602 against plain
    HOOI's 33.579)."""
    A, B = _many_on_small_layer()
    A, B = [a.to(dtype) for a in A], [b.to(dtype) for b in B]
    kw = dict(rank=16, method="sum", stop="subspace", tol=1e-9, max_iter=3000)
    plain = ck.merge_layer(A, B, accelerate=False, **kw)
    fast = ck.merge_layer(A, B, **kw)
    assert relerr(fast.delta.double(), plain.delta.double()) <= 1e-5
    assert fast.info.iterations < plain.info.iterations / 2          # measured: 59 / 212, 75 / 301


def _solver(A, B, rank, layers=1, **kw):
    """A ``_HOOISolve`` over ``layers`` copies of one layer (whitened as the engine does)."""
    group = [(A, B, [1.0] * len(A), [1.0] * len(A))] * layers
    Bh, Ah, cs = engine._stack(group, max(a.shape[0] for a in A), torch.float64, torch.device("cpu"))
    T = len(A)
    Bs = Bh * cs[:, None, :]
    rtol = engine.WHITEN_RTOL[torch.float64]
    sb, sa = engine._whiten_inner(Bs.mT @ Bs, T, rtol), engine._whiten_inner(Ah @ Ah.mT, T, rtol)
    nu = (sb.blocks * sa.blocks).sum((-2, -1)).sqrt()
    c = torch.stack([ref.subspace_weights(nu[l], 0.0) for l in range(layers)])
    opts = dict(stop="energy", tol=1e-6, accelerate=True)
    opts.update(kw)
    return engine._HOOISolve(sb, sa, c, T, rank, **opts)


def _ops_of(fn):
    """The aten operators ``fn()`` runs, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return seen


def test_a_sweep_issues_the_same_operators_for_any_number_of_layers():
    """GPU-ready: a sweep of a group runs batched operators, none per layer. The same layer
    repeated 2, 3 and 8 times (so every layer takes the same branches) runs the same list of
    operators in each of its first sweeps. (One layer alone runs two fewer: torch's batched
    matmul copies a permuted operand only when the batch has more than one layer.)"""
    g = torch.Generator().manual_seed(2)
    A = [torch.randn(6, 120, generator=g, dtype=torch.float64) for _ in range(5)]
    B = [torch.randn(100, 6, generator=g, dtype=torch.float64) for _ in range(5)]
    runs = {}
    for L in (2, 3, 8):
        solver = _solver(A, B, 8, layers=L)
        runs[L] = [_ops_of(solver.sweep) for _ in range(6)]
    assert runs[2] == runs[3] == runs[8]
    assert all(len(ops) > 20 for ops in runs[2])


def test_no_eigensolve_wider_than_32_in_the_sweeps(monkeypatch):
    """GPU-ready: the HOOI sweeps of the default route solve only block-wide eigenproblems
    (b = 32 at rank 16), never the k x k one of a half-step (k = 160 here), under the GPU's
    policy (``SolverSettings(filter_budget=False)``: on the CPU a half-step whose filter would cost more than
    an exact solve takes the exact one)."""
    g = torch.Generator().manual_seed(3)
    A = [torch.randn(16, 200, generator=g, dtype=torch.float64) for _ in range(10)]
    B = [torch.randn(180, 16, generator=g, dtype=torch.float64) for _ in range(10)]
    solver = _solver(A, B, 16, settings=engine.SolverSettings(filter_budget=False))
    sizes = []
    for name in ("eigh", "eigvalsh", "svd", "eig"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name,
                            lambda M, *a, _real=real, **k: sizes.append(M.shape[-1]) or _real(M, *a, **k))
    for _ in range(10):
        solver.sweep()
    assert sizes and max(sizes) == 32


def test_a_growing_step_closes_the_gate_and_empties_the_history():
    """The restart on a growing step, forced: a layer whose step grows past restart_growth times
    its last one shuts its gate, forgets its ratios and its extrapolation history."""
    from benchmarks.bench_layer import make_adapters

    A, B = make_adapters("gaussian", 96, 96, 4, 8, torch.float64, "cpu")   # its gate opens at sweep 8
    solver = _solver(A, B, 8)
    for _ in range(40):
        solver.sweep()
        if bool(solver.acc.gate.all()) and int(solver.acc.anderson.age.min()) >= 2:
            break
    assert bool(solver.acc.gate.all()) and int(solver.acc.anderson.age.min()) >= 2
    solver.steps[:] = 1e-300                      # the next step is far more than twice this one
    solver.sweep()
    assert not bool(solver.acc.gate.any())
    assert bool(torch.isnan(solver.acc.ratios[:, :-1]).all())
    assert int(solver.acc.anderson.age.max()) <= 1          # only this sweep's pair since the restart
    assert not bool(solver.acc.extrapolated.any())


def test_gate_ratios_come_from_plain_sweeps_only():
    """The gate reads the ratios of successive PLAIN steps: a sweep that started from an
    extrapolated point leaves the ratios and the last plain step as they were; a plain one
    rolls its ratio in. Three steady plain ratios open the gate and record the rate."""
    A, B = _seed4_set()
    solver = _solver(A, B, 8)
    solver.acc.plain_step[:] = 1e-2
    solver.acc.ratios[:] = math.nan
    solver.acc.watch_gate(torch.tensor([5e-3], dtype=torch.float64), torch.tensor([False]))
    assert bool(torch.isnan(solver.acc.ratios).all()) and float(solver.acc.plain_step) == 1e-2
    for step in (5e-3, 2.5e-3, 1.25e-3):
        opening = solver.acc.watch_gate(torch.tensor([step], dtype=torch.float64), torch.tensor([True]))
    assert solver.acc.ratios.tolist() == [[0.5, 0.5, 0.5]] and bool(opening.all()) and bool(solver.acc.gate.all())
    assert float(solver.acc.rate) == 0.5


def test_a_rejected_extrapolation_is_replaced_and_closes_the_gate():
    """The monotone check, forced: an extrapolated point whose objective falls below the plain
    image's is replaced by that image, the U half-step redone from it, and the layer's gate
    shut with its history dropped."""
    A, B = _seed4_set()
    solver = _solver(A, B, 8)
    for _ in range(3):
        solver.sweep()
    solver.acc.extrapolated[:] = True
    solver.acc.gate[:] = True
    solver.f[:] = 1e300                           # nothing can match this: a certain rejection
    U1, fa = solver.half(True, solver.x, solver.U, ~solver.done)
    U1r, far = solver._monotone(U1, fa, ~solver.done)
    assert torch.equal(solver.x, solver.V)
    assert not bool(solver.acc.extrapolated.any()) and not bool(solver.acc.gate.any())
    assert int(solver.acc.anderson.age.max()) == 0
    assert bool(torch.isfinite(far).all())


def _wide_set(seed, T, m, n, kind):
    """``T`` adapters of mixed ranks 12-16 on an ``m x n`` layer: whitened problems of 256 and
    more, where topk_eigh takes LAPACK's partial solver."""
    g = torch.Generator().manual_seed(seed)
    ranks = [int(r) for r in torch.randint(12, 17, (T,), generator=g)]
    A = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in ranks]
    B = [torch.randn(m, r, generator=g, dtype=torch.float64) / m ** 0.5 for r in ranks]
    if kind == "structured":
        Us, Vs = torch.randn(m, 2, generator=g, dtype=torch.float64) / m ** 0.5, torch.randn(2, n, generator=g, dtype=torch.float64)
        for a, b in zip(A, B):
            b[:, :2] = 3.0 * Us + 0.3 * b[:, :2]
            a[:2] = 3.0 * Vs + 0.3 * a[:2]
    scales = torch.exp(0.8 * torch.randn(T, generator=g, dtype=torch.float64)).tolist()
    return A, B, scales


@pytest.mark.parametrize("seed,T,m,n,kind,beta", [(0, 20, 300, 280, "gaussian", 0.0),
                                                  (1, 22, 260, 400, "structured", 1.0),
                                                  (2, 24, 330, 330, "gaussian", 0.5)],
                         ids=["gaussian-300x280-T20", "structured-260x400-T22", "gaussian-330-T24-beta0.5"])
def test_partial_eigensolver_keeps_the_fixed_point(seed, T, m, n, kind, beta, monkeypatch):
    """The HOOI half-steps' top-r pairs from LAPACK's partial solver or from a full eigh: the same
    fixed point at tight tol (merged updates within 1e-6, objectives within 1e-12)."""
    A, B, scales = _wide_set(seed, T, m, n, kind)
    kw = dict(rank=16, method="sum", beta=beta, scales=scales, stop="subspace", tol=1e-10, max_iter=20000)
    routes = {}
    for route in ("full", "partial"):
        monkeypatch.setenv("CTM_KERNELS_TOPK_EIGH", route)
        routes[route] = ck.merge_layer(A, B, **kw)
    full, partial = routes["full"], routes["partial"]
    assert full.info.converged and partial.info.converged
    assert relerr(partial.delta, full.delta) <= 1e-6
    assert abs(partial.info.objective - full.info.objective) <= 1e-12 * abs(full.info.objective)


def _record_objectives(monkeypatch):
    seen, sweep = [], engine._HOOISolve.sweep

    def recording(self):
        sweep(self)
        seen.append(self.f.clone())
    monkeypatch.setattr(engine._HOOISolve, "sweep", recording)
    return seen


@pytest.mark.parametrize("index", range(0, 60, 3), ids=_label)
def test_objective_never_decreases(index, monkeypatch):
    """Every sweep of the accelerated solve (float32 phase included) ends at an objective at
    least that of the sweep before: extrapolations that would lose are not kept."""
    case = hooi_case(index)
    seen = _record_objectives(monkeypatch)
    _merge(case, **TIGHT)
    f = torch.stack(seen)[:, 0]
    assert bool((f[1:] >= f[:-1] - 1e-12 * f[:-1].abs()).all())


def _total_kept(info):
    return total_energy_kept(info.energy_kept, info.norms)


@pytest.mark.parametrize("index", range(ENERGY_CASES), ids=_label)
def test_default_stop_keeps_the_energy_of_the_converged_answer(index):
    """The default stop (energy, tol 1e-6) keeps the total energy of the converged answer
    within 1e-5 (relative; worst of these 100 sets 2.7e-6) and its merged update within 1e-2
    (worst 4e-3: on flat spectra the fixed point is ill-conditioned, which is what the
    subspace stop is for)."""
    case = hooi_case(index)
    conv = _merge(case, accelerate=False, **TIGHT)
    out = _merge(case)
    assert out.info.stopped_by == "energy" and out.info.converged
    assert abs(_total_kept(out.info) - _total_kept(conv.info)) <= 1e-5 * _total_kept(conv.info)
    assert float((out.delta - conv.delta).norm()) <= 1e-2 * float(conv.delta.norm())


def test_plain_energy_stop_is_the_reference_one():
    """accelerate=False with the energy stop takes the reference's sweeps and stops where it
    does (the same test on the same numbers)."""
    for index in (0, 1, 2, 3):
        case = hooi_case(index)
        dWs = ref.dense_updates(case.A, case.B, case.scales)
        want = ref.ctm(dWs, case.rank, "sum", beta=case.beta)
        out = _merge(case, accelerate=False)
        assert out.info.stopped_by == want.stopped_by == "energy"
        assert out.info.iterations == want.iterations
        assert relerr(out.delta, want.dW) <= 1e-8


def test_info_says_which_test_stopped_a_layer():
    case = hooi_case(5)
    assert _merge(case).info.stopped_by == "energy"
    assert _merge(case, stop="subspace").info.stopped_by == "subspace"
    capped = _merge(case, stop="subspace", tol=1e-14, max_iter=2)
    assert capped.info.stopped_by == "max_iter" and not capped.info.converged
    assert capped.info.iterations == 2


@pytest.mark.parametrize("kw, message", [
    (dict(stop="angle"), "stop must be one of energy, subspace"),
    (dict(tol=0.0), "tol must be a positive number"),
    (dict(tol=True), "tol must be a positive number"),
], ids=["unknown_stop", "zero_tol", "bool_tol"])
def test_bad_stop_settings_are_refused(kw, message):
    case = hooi_case(1)
    with pytest.raises(ValueError, match=message):
        _merge(case, **kw)


def test_energy_left_estimate():
    """The estimate of what a linearly converging sequence still changes: exact for a
    geometric sequence, infinite while unknown or not shrinking, zero at rounding."""
    q = 0.9
    changes = torch.tensor([1e-3, 1e-3 * q, 1e-3 * q * q], dtype=torch.float64)
    assert math.isclose(float(ref.energy_left(changes)), 1e-3 * q ** 3 / (1 - q), rel_tol=1e-12)
    assert float(ref.energy_left(torch.tensor([math.nan, 1e-3, 1e-4]))) == math.inf
    assert float(ref.energy_left(torch.tensor([1e-4, 1e-4, 2e-4]))) == math.inf
    assert float(ref.energy_left(torch.tensor([1.0, 1e-14, 1e-14]))) == 0.0
    # the same geometric decrease, falling instead of rising: the same estimate
    assert math.isclose(float(ref.energy_left(-changes)), 1e-3 * q ** 3 / (1 - q), rel_tol=1e-12)


def test_energy_left_distrusts_a_window_that_changes_sign():
    """Two modes of opposite sign passing each other make one change small for a sweep; the
    numbers of the 22 x 96 set where the linear estimate stopped 1.3e-5 short. A window with
    changes of both signs estimates REVERSAL_FACTOR times its largest change, so the energy
    test goes on; rounding-level changes of either sign do not count as a reversal."""
    window = torch.tensor([-5.73e-5, -1.09e-5, 1.13e-6], dtype=torch.float64)
    assert float(ref.energy_left(window.abs())) == pytest.approx(1.13e-6)   # one-signed: about the last change
    assert float(ref.energy_left(window)) == pytest.approx(ref.REVERSAL_FACTOR * 5.73e-5)
    assert float(ref.energy_left(torch.tensor([1e-3, 1e-4, -1e-14]))) < 1e-4


def test_energy_stop_on_the_set_whose_energy_changes_sign():
    """hooi_case(58), where the energy kept first falls, then rises: the default stop ends
    within 1e-6 of the converged total, accelerated or not (4.8e-7; the linear estimate
    alone, without the reversal rule, stopped 2.7e-6 short)."""
    case = hooi_case(58)
    want = _total_kept(_merge(case, accelerate=False, **TIGHT).info)
    for accelerate in (True, False):
        out = _merge(case, accelerate=accelerate)
        assert abs(_total_kept(out.info) - want) <= 1e-6 * want, (accelerate, out.info.iterations)


def _orthonormal_batch(g, *shape):
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e5, 1e9, math.inf], ids=lambda c: f"cond{c:g}")
def test_polar_factor_is_the_svd_one(cond):
    """``engine._polar`` (eigh of ``M^T M``, the SVD where that is near singular) equals the
    SVD's polar factor ``X Y^T`` on well-conditioned, ill-conditioned and singular matrices."""
    g = torch.Generator().manual_seed(3)
    r = 16
    X, Y = _orthonormal_batch(g, 2, 5, r, r), _orthonormal_batch(g, 2, 5, r, r)
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64) if math.isfinite(cond) else \
        torch.cat([torch.ones(r - 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)])
    M = (X * s) @ Y.mT
    U, _, Vh = torch.linalg.svd(M)
    want = U @ Vh
    got = engine._polar(M)
    assert relerr(got, want) <= 1e-12
    assert relerr(got.mT @ got, torch.eye(r, dtype=torch.float64).expand_as(got)) <= 1e-12


def test_anderson_step_leaves_stopped_and_held_layers_alone(monkeypatch):
    """Stopped layers (``skip``) and layers whose gate is shut (``hold``) take their image and are
    not computed: the polar factors of the history are formed for the other layers only. A held
    layer still records its pairs, so it extrapolates as soon as its gate opens."""
    g = torch.Generator().manual_seed(5)
    L, R, r = 4, 24, 4
    base = _orthonormal_batch(g, L, R, r)
    layers_seen = []
    polar = engine._polar
    monkeypatch.setattr(engine, "_polar", lambda M: layers_seen.append(M.shape[1]) or polar(M))
    acc = engine._Anderson(engine.DEFAULT_SOLVER.anderson_depth)
    skip = torch.tensor([False, True, False, False])
    hold = torch.tensor([False, False, False, True])
    x = base
    for i in range(5):
        if i == 4:
            hold[3] = False                 # the gate opens
            layers_seen.clear()
        img = torch.linalg.qr(base + 0.3 ** (i + 1) * torch.randn(L, R, r, generator=g, dtype=torch.float64))[0]
        nxt, extrapolated = acc.step(x, img, hold, skip)
        for held in (1, 3) if i < 4 else (1,):
            assert torch.equal(nxt[held], img[held]) and not bool(extrapolated[held])
        if i == 3:
            assert layers_seen and set(layers_seen) == {2}
        x = nxt
    assert layers_seen == [3]
    assert bool(extrapolated[0]) and bool(extrapolated[2]) and bool(extrapolated[3])


@pytest.mark.parametrize("field,value", [("anderson_depth", 0), ("stall_sweeps", 2.5), ("gate_window", True),
                                         ("max_degree", -1), ("factored_guard", -1), ("restart_growth", 1.0),
                                         ("trust", 0.5), ("gate_drift", 1.0), ("monotone_slack", -1e-12),
                                         ("inner_damping", 0.0), ("exact_route", "fast"), ("filter_budget", 1)],
                         ids=lambda v: str(v))
def test_solver_settings_are_checked_when_made(field, value):
    with pytest.raises(ValueError, match=f"SolverSettings.{field}"):
        engine.SolverSettings(**{field: value})


def test_solver_settings_are_frozen_and_refused_unless_settings():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.DEFAULT_SOLVER.trust = 3.0
    A, B = _seed4_set()
    with pytest.raises(ValueError, match="solver must be a SolverSettings"):
        ck.merge_layer(A, B, rank=8, solver={"trust": 3.0})


def test_solver_settings_reach_the_sweeps():
    """Settings are passed, not patched: with a stall guard of one sweep every accelerated layer
    falls back to plain sweeps at once, and takes plain HOOI's sweeps to the same fixed point;
    the defaults take far fewer (measured: 114 against 332 and 347)."""
    from benchmarks.bench_layer import make_adapters

    A, B = make_adapters("gaussian", 96, 96, 4, 8, torch.float64, "cpu")
    kw = dict(rank=8, method="sum", stop="subspace", tol=1e-10, max_iter=3000)
    default = ck.merge_layer(A, B, **kw)
    stalled = ck.merge_layer(A, B, solver=engine.SolverSettings(stall_sweeps=1), **kw)
    plain = ck.merge_layer(A, B, accelerate=False, **kw)
    assert relerr(stalled.delta, plain.delta) <= 1e-6 and relerr(default.delta, plain.delta) <= 1e-6
    assert default.info.iterations * 2 < stalled.info.iterations
    assert abs(stalled.info.iterations - plain.info.iterations) <= plain.info.iterations // 5


def _energy_test_run(monkeypatch, gains, tol=1e-6, **settings):
    """Feeds one layer's energy test objectives with the given relative gains (and a total
    energy kept that moves by the same amounts); returns what each sweep said."""
    test = engine._EnergyTest(torch.ones(1, 1, dtype=torch.float64), tol, engine.SolverSettings(**settings))
    f = torch.tensor([1.0], dtype=torch.float64)
    said, f_old = [], torch.tensor([-math.inf], dtype=torch.float64)
    for g in [0.5] + list(gains):
        f = f * (1 + g)
        monkeypatch.setattr(engine, "adapter_energies", lambda *a, _f=f: _f[:, None] / 10)
        passed, flat = test.passes(f_old, f, SimpleNamespace(T=1, ops={"a": None, "b": None}),
                                   None, None, torch.tensor([True]))
        said.append("energy" if bool(passed) else "flat" if bool(flat) else "-")
        f_old = f
    return said[1:]


def test_a_plateau_ends_flat_after_flat_sweeps_sweeps(monkeypatch):
    """Gains of 2e-7 a sweep that do not shrink: the window cannot bound what is left, and after
    twenty such sweeps in a row (below tol / 2) the layer is flat; one gain above tol / 2
    restarts the count; gains that halve pass the energy test itself."""
    assert engine.DEFAULT_SOLVER.flat_sweeps == ref.FLAT_SWEEPS == 20 and ref.FLAT_SHARE == 0.5
    said = _energy_test_run(monkeypatch, [2e-7] * 22)
    assert said.index("flat") == 19 and "energy" not in said
    said = _energy_test_run(monkeypatch, [2e-7] * 6 + [7e-7] + [2e-7] * 22)
    assert said.index("flat") == 26
    assert _energy_test_run(monkeypatch, [1e-5 * 0.5 ** k for k in range(12)])[-1] == "energy"
    assert "flat" not in _energy_test_run(monkeypatch, [2e-7] * 22, flat_sweeps=23)
    assert "flat" not in _energy_test_run(monkeypatch, [2e-7] * 22, flat_share=0.1)


@pytest.mark.parametrize("index", [164, 1189, 1308, 2589])
def test_a_flat_layer_says_so_and_plain_hooi_ends_it_where_the_reference_does(index):
    """Sets of the agreement benchmark whose default stop ends flat (measured: within 8.9e-4 of
    the converged total energy kept at worst, 1189): the engine reports ``"flat"`` as a
    converged stop, keeps the total energy within 1e-3 of the converged answer, and plain HOOI
    (``accelerate=False``) stops flat on the same sweep as the reference's HOOI."""
    case = hooi_case(index)
    out = _merge(case)
    conv = _merge(case, **TIGHT)
    assert out.info.stopped_by == "flat" and out.info.converged
    assert abs(_total_kept(out.info) - _total_kept(conv.info)) <= 1e-3 * _total_kept(conv.info)
    plain = _merge(case, accelerate=False)
    want = ref.ctm(ref.dense_updates(case.A, case.B, case.scales), case.rank, "sum", beta=case.beta)
    assert plain.info.stopped_by == want.stopped_by == "flat"
    assert plain.info.iterations == want.iterations
    assert relerr(plain.delta, want.dW) <= 1e-8
