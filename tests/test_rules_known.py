"""Known answers for every merge rule and for the subspace weights.

Each expected output below is written from the definitions (DESIGN.md section 4 for the rules,
section 2 step 1 for the weights ``c_t``), worked out by hand on small inputs; none is computed
by calling the rule under test. ``test_known_answer`` runs them; ``test_wrong_variant_is_caught``
replaces one piece of a rule by a plausible wrong variant and checks that the known answer of
that rule then fails, so each check is shown to be able to fail.
"""
from __future__ import annotations

import math

import pytest
import torch

import ctm_kernels
from ctm_kernels import engine, reference, rules
from ctm_kernels.rules import apply_rule

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def merged(method, Cs, **params):
    """``Cs``: nested lists ``[T][p][q]`` -> the rule's ``[p, q]`` result (one layer)."""
    return apply_rule(method, t(Cs)[None], **params)[0]


def close(got, want, atol=1e-12):
    want = t(want) if not torch.is_tensor(want) else want
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert torch.allclose(got, want, rtol=0, atol=atol), f"\n got  {got.tolist()}\n want {want.tolist()}"


# --------------------------------------------------------------------------------------------
# sum, mean


def ka_sum_mean():
    Cs = [[[1.0, 2.0]], [[3.0, -1.0]], [[0.0, 0.0]]]          # third adapter is zero
    close(merged("sum", Cs), [[4.0, 1.0]])
    close(merged("mean", Cs), [[4 / 3, 1 / 3]])                # T counts the zero adapter


# --------------------------------------------------------------------------------------------
# TIES


def ka_ties_keep_count():
    """One task (the election is then trivial): what survives is exactly the trim.
    d = 6 entries, k = max(1, round(top_k * d))."""
    C = [[[6.0, -5.0, 4.0], [-3.0, 2.0, 1.0]]]
    close(merged("ties", C, top_k=1.0), C[0])
    close(merged("ties", C, top_k=0.9), [[6, -5, 4], [-3, 2, 0]])     # 5.4 -> 5
    close(merged("ties", C, top_k=0.5), [[6, -5, 4], [0, 0, 0]])      # 3.0 -> 3 (int(3)+1 would keep 4)
    close(merged("ties", C, top_k=0.45), [[6, -5, 4], [0, 0, 0]])     # 2.7 -> 3 (floor: 2)
    close(merged("ties", C, top_k=0.3), [[6, -5, 0], [0, 0, 0]])      # 1.8 -> 2
    close(merged("ties", C, top_k=0.05), [[6, 0, 0], [0, 0, 0]])      # 0.3 -> 0 -> max(1, .) = 1
    assert [rules.ties_keep_count(k, 6) for k in (0.05, 0.3, 0.45, 0.5, 0.9, 1.0)] == [1, 2, 3, 3, 5, 6]


def ka_ties_threshold_ties():
    """Entries equal to the k-th largest |value| are all kept."""
    C = [[[3.0, -2.0], [2.0, 1.0]]]
    close(merged("ties", C, top_k=0.25), [[3, 0], [0, 0]])            # k = 1
    close(merged("ties", C, top_k=0.5), [[3, -2], [2, 0]])            # k = 2, |-2| = |2| both kept


# three tasks, one row of six entries, nothing trimmed (top_k = 1):
#   entry 0: 1 + 1 - 3 = -1 -> elected -, only task 3 agrees            -> -3 / 1
#            (a count election would pick +; dividing by T would give -1)
#   entry 1: 2 + 4 - 1 = 5  -> +, tasks 1, 2 agree                      -> 6 / 2 = 3
#   entry 2: 1 - 1 + 0 = 0  -> zero sum: sign of the sum of the layer's elected signs
#            (-1 + 1 + 0 + 0 + 1 + 1 = 2 -> +), task 1 agrees          -> 1
#   entry 3: all zero       -> no task agrees                           -> 0
#   entry 4: 2, 0, 0        -> +                                        -> 2 / 1
#   entry 5: 1, 1, 1        -> +                                        -> 1
ELECTION = [[[1.0, 2.0, 1.0, 0.0, 2.0, 1.0]], [[1.0, 4.0, -1.0, 0.0, 0.0, 1.0]], [[-3.0, -1.0, 0.0, 0.0, 0.0, 1.0]]]
ELECTED = [[-3.0, 3.0, 1.0, 0.0, 2.0, 1.0]]


def ka_ties_election_and_divisor():
    close(merged("ties", ELECTION, top_k=1.0), ELECTED)
    # a second layer, every value negated: its elected signs sum to -2, so its zero-sum entry
    # takes '-' (the fallback is per layer); the result is the first layer's, negated
    batch = t([ELECTION, [[[-v for v in row] for row in task] for task in ELECTION]])
    out = apply_rule("ties", batch, top_k=1.0)
    close(out[0], ELECTED)
    close(out[1], [[-v for v in ELECTED[0]]])


def _ties_by_hand(tasks: list[list[float]], k: int) -> list[float]:
    """TIES on flat per-task lists, written out with plain loops from DESIGN.md section 4."""
    kept = []
    for v in tasks:
        thresh = sorted((abs(x) for x in v), reverse=True)[k - 1]
        kept.append([x if abs(x) >= thresh else 0.0 for x in v])
    d = len(tasks[0])
    sign = lambda x: (x > 0) - (x < 0)
    elected = [sign(sum(kv[i] for kv in kept)) for i in range(d)]
    fallback = sign(sum(elected))
    elected = [e if e != 0 else fallback for e in elected]
    out = []
    for i in range(d):
        agree = [kv[i] for kv in kept if kv[i] != 0 and sign(kv[i]) == elected[i]]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def ka_ties_trim_then_elect():
    """Trim and election together, against the loop version above (k = round(0.4 * 8) = 3)."""
    tasks = [[0.9, -0.2, 0.5, -0.7, 0.1, 0.3, -0.6, 0.05],
             [-0.8, 0.4, 0.45, 0.3, -0.9, 0.2, 0.1, -0.35],
             [0.6, -0.5, -0.1, -0.65, 0.2, 0.7, 0.15, 0.25]]
    want = _ties_by_hand(tasks, 3)
    close(merged("ties", [[[x for x in v[:4]], [x for x in v[4:]]] for v in tasks], top_k=0.4),
          [want[:4], want[4:]])


# --------------------------------------------------------------------------------------------
# DARE


def documented_keep_mask(shape, p, seed, layer_id):
    """The mask docs/DESIGN.md fixes: a CPU generator seeded with ``seed + layer_id * 1000003``,
    float64 uniforms in [0, 1) of shape ``[T, p, q]``, an entry survives where its draw is >= p."""
    g = torch.Generator(device="cpu").manual_seed(seed + layer_id * 1_000_003)
    return torch.rand(shape, generator=g, dtype=F64) >= p


def ka_dare_rescale():
    """Survivors are rescaled by 1/(1-p): every output entry is 0 or C * 4/3 at p = 1/4, and
    about 3/4 of 4000 entries survive (5 standard deviations: +-0.034)."""
    C = torch.arange(1, 4001, dtype=F64).reshape(1, 1, 40, 100)
    out = apply_rule("dare", C, p=0.25, seed=11)[0]
    ratio = out / C[0, 0]
    survived = ratio > 0
    assert torch.allclose(ratio[survived], t(4 / 3).expand(int(survived.sum())), rtol=1e-15, atol=0)
    kept = float(survived.double().mean())
    assert abs(kept - 0.75) < 0.034, kept
    close(merged("dare", [[[2.0, -1.0]], [[0.5, 3.0]]], p=0.0, seed=3), [[2.5, 2.0]])   # p = 0: the sum


def ka_dare_seed_and_layer():
    """The mask is the documented draw, depends on the seed and on the layer id, and a layer
    gets the same mask alone or in a batch."""
    g = torch.Generator().manual_seed(0)
    C = torch.randn(2, 5, 7, generator=g, dtype=F64)           # [T, p, q]
    p = 0.4
    for seed, lid in ((0, 0), (5, 0), (5, 3)):
        want = (C * documented_keep_mask(C.shape, p, seed, lid) / (1 - p)).sum(0)
        close(apply_rule("dare", C[None], p=p, seed=seed, layer_ids=[lid])[0], want)
    batch = apply_rule("dare", torch.stack([C, C]), p=p, seed=5, layer_ids=[0, 3])
    close(batch[1], apply_rule("dare", C[None], p=p, seed=5, layer_ids=[3])[0])
    assert not torch.allclose(batch[0], batch[1])
    assert not torch.allclose(apply_rule("dare", C[None], p=p, seed=5)[0], apply_rule("dare", C[None], p=p, seed=6)[0])


def ka_dare_ties():
    """DARE (documented mask, 1/(1-p)) then TIES (loop version) on the rescaled entries."""
    g = torch.Generator().manual_seed(1)
    C = torch.randn(3, 2, 4, generator=g, dtype=F64)
    p, seed, lid = 0.3, 9, 2
    dropped = C * documented_keep_mask(C.shape, p, seed, lid) / (1 - p)
    want = _ties_by_hand([row.flatten().tolist() for row in dropped], 4)     # round(0.45 * 8) = 4
    got = apply_rule("dare_ties", C[None], p=p, seed=seed, top_k=0.45, layer_ids=[lid])[0]
    close(got, t(want).reshape(2, 4))


# --------------------------------------------------------------------------------------------
# TSV


def ka_tsv_polar():
    """r = 2, T = 2: each task keeps max(1, floor(2/2)) = 1 component. Kept left vectors e1 and
    u = (cos a, sin a) are not orthogonal: their polar factor is the rotation nearest to
    X = [[1, cos a], [0, sin a]], i.e. [[x + w, y - z], [z - y, x + w]] / norm for X = [[x, y], [z, w]]
    (det X > 0); the right vectors e1, e2 are already orthonormal."""
    a = math.pi / 3
    ca, sa = math.cos(a), math.sin(a)
    C1 = [[2.0, 0.0], [0.0, 0.5]]                                     # 2 e1 e1^T + 0.5 e2 e2^T
    C2 = [[-0.25 * sa, ca], [0.25 * ca, sa]]                          # 1 u e2^T + 0.25 u_perp e1^T
    n = math.hypot(1 + sa, ca)
    R = [[(1 + sa) / n, ca / n], [-ca / n, (1 + sa) / n]]
    close(merged("tsv", [C1, C2]), [[2 * R[0][0], R[0][1]], [2 * R[1][0], R[1][1]]])


def ka_tsv_keep_count():
    """r = 4, T = 3: floor(4/3) = 1 component per task (ceil would keep 2). The kept vectors
    e1, e2, e3 are orthonormal, so the result is the sum of the kept components."""
    C1 = torch.diag(t([5.0, 0.0, 0.0, 0.5]))
    C2 = torch.diag(t([0.3, 4.0, 0.0, 0.0]))
    C3 = torch.diag(t([0.0, 0.2, 3.0, 0.0]))
    close(apply_rule("tsv", torch.stack([C1, C2, C3])[None])[0], torch.diag(t([5.0, 4.0, 3.0, 0.0])))
    # r = 2 < T = 3: floor(2/3) = 0, so max(1, .) keeps one each. Left vectors [e1, e2, e1]
    # have polar factor [[1/sqrt2, 0, 1/sqrt2], [0, 1, 0]], right ones [e1, e2, e2]
    # [[1, 0, 0], [0, 1/sqrt2, 1/sqrt2]]; with singular values (2, 1, 3) the product is
    # [[sqrt2, 3/2], [0, 1/sqrt2]]
    Cs = [[[2.0, 0.0], [0.0, 0.1]], [[0.1, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.1, 0.0]]]
    close(merged("tsv", Cs), [[math.sqrt(2), 1.5], [0.0, 1 / math.sqrt(2)]])
    assert [rules.tsv_keep_count(d, T) for d, T in ((4, 3), (2, 3), (16, 8), (16, 5))] == [1, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# Iso-C, Iso-CTS


def ka_iso_c():
    # sum [[0, 3], [1, 0]] = 3 e1 e2^T + 1 e2 e1^T: both singular values become 2
    close(merged("iso_c", [[[0.0, 2.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]), [[0.0, 2.0], [2.0, 0.0]])
    # sum diag(3, 1, 0): the zero singular value stays zero, the mean is over (3, 1)
    close(apply_rule("iso_c", torch.stack([torch.diag(t([3.0, 0, 0])), torch.diag(t([0, 1.0, 0]))])[None])[0],
          torch.diag(t([2.0, 2.0, 0.0])))
    close(merged("iso_c", [[[1.0, 0.0]], [[-1.0, 0.0]]]), [[0.0, 0.0]])      # zero sum -> zero


def ka_iso_cts():
    """d = 3, T = 2: common subspace of d - T = 1 direction of the sum diag(4, 1, 0.5) (e1, 4);
    residuals e2 e2^T (task 1) and 0.5 e3 e3^T (task 2) add e2 and e3; the directions are
    orthonormal already, the scale is the mean (4 + 1 + 0.5) / 3 = 11/6."""
    C1 = torch.diag(t([2.0, 1.0, 0.0]))
    C2 = torch.diag(t([2.0, 0.0, 0.5]))
    close(apply_rule("iso_cts", torch.stack([C1, C2])[None])[0], 11 / 6 * torch.eye(3, dtype=F64))
    try:
        apply_rule("iso_cts", torch.stack([C1, C2, C2])[None])          # T = 3 = d
    except ValueError as e:
        assert "iso_cts needs fewer adapters than the rank" in str(e)
    else:
        raise AssertionError("iso_cts accepted T = 3 adapters at rank 3")


# --------------------------------------------------------------------------------------------
# subspace weights c_t = (beta nu_t + (1 - beta) mean(nu)) / nu_t (mean over nonzero adapters)

# nu = (1, 3): mean 2
WEIGHTS = {0.0: (2.0, 2 / 3), 0.25: (1.75, 0.75), 0.5: (1.5, 5 / 6), 0.75: (1.25, 11 / 12), 1.0: (1.0, 1.0)}


def ka_subspace_weights():
    for beta, (c1, c2) in WEIGHTS.items():
        close(reference.subspace_weights(t([1.0, 3.0]), beta), [c1, c2])
        # zero adapters get weight 0 and do not enter the mean
        close(reference.subspace_weights(t([0.0, 1.0, 0.0, 3.0]), beta), [0.0, c1, 0.0, c2])
        close(reference.subspace_weights(t([0.0, 0.0]), beta), [0.0, 0.0])


def _rank1_layer(zeros: int):
    """Adapters on a 4 x 4 layer: two of norm 1 along e1 f1^T, one of norm 3 along e2 f2^T,
    then ``zeros`` zero adapters. At rank 1 the subspace keeps e1 iff
    2 (c nu)_1^2 > (c nu)_3^2, i.e. sqrt2 (beta + (1 - beta) m) > 3 beta + (1 - beta) m with
    m = mean of the nonzero norms = 5/3: iff beta < (sqrt2 - 1) m / ((sqrt2 - 1) m + 3 - sqrt2) = 0.303.
    (Were the zero adapters counted in the mean, m = 1 with two of them and the switch would
    move to beta = 0.207.)"""
    e = torch.eye(4, dtype=F64)
    A = [e[0:1].clone(), e[0:1].clone(), e[1:2].clone()] + [torch.zeros(1, 4, dtype=F64)] * zeros
    B = [e[:, 0:1].clone(), e[:, 0:1].clone(), 3 * e[:, 1:2]] + [torch.zeros(4, 1, dtype=F64)] * zeros
    return A, B


def ka_beta_end_to_end():
    """Through the engine, at every beta of the paper's grid and with zero adapters."""
    for zeros in (0, 2):
        A, B = _rank1_layer(zeros)
        for beta in (0.0, 0.25, 0.5, 0.75, 1.0):
            plan = ctm_kernels.prepare(A, B, rank=1, beta=beta)
            U, V = plan.bases()
            axis = 0 if beta < 0.303 else 1
            assert abs(abs(float(U[axis, 0])) - 1) < 1e-9, (zeros, beta, U[:, 0].tolist())
            assert abs(abs(float(V[axis, 0])) - 1) < 1e-9, (zeros, beta, V[:, 0].tolist())
            C = plan.coordinates
            assert torch.isfinite(C).all() and (C[3:] == 0).all()
            kept = plan.info.energy_kept
            assert kept[3:] == [0.0] * zeros
            close(t(kept[:3]), [1.0, 1.0, 0.0] if axis == 0 else [0.0, 0.0, 1.0], atol=1e-12)
            assert torch.isfinite(plan.merge("ties", top_k=0.5).delta).all()


KNOWN = {f.__name__[3:]: f for f in (
    ka_sum_mean, ka_ties_keep_count, ka_ties_threshold_ties, ka_ties_election_and_divisor, ka_ties_trim_then_elect,
    ka_dare_rescale, ka_dare_seed_and_layer, ka_dare_ties, ka_tsv_polar, ka_tsv_keep_count, ka_iso_c, ka_iso_cts,
    ka_subspace_weights, ka_beta_end_to_end)}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_answer(name):
    KNOWN[name]()


# --------------------------------------------------------------------------------------------
# wrong variants: each must make the named known answer fail


def _replace_rule(monkeypatch, name, fn):
    monkeypatch.setitem(rules.RULES, name, rules.Rule(name, fn, rules.RULES[name].params,
                                                      rules.RULES[name].needs_rotation_convention))


def _ties_divide_by_T(kept):
    total = kept.sum(1)
    elected = torch.sign(total)
    fallback = torch.sign(elected.sum((-2, -1), keepdim=True)).expand_as(elected)
    elected = torch.where(elected == 0, fallback, elected)
    agree = (torch.sign(kept) == elected[:, None]) & (kept != 0)
    return (kept * agree).sum(1) / kept.shape[1]


def _ties_count_election(kept):
    """mergekit's 'count' election: the sign held by more tasks, not by more mass."""
    votes = torch.sign(kept).sum(1)
    elected = torch.sign(votes)
    agree = (torch.sign(kept) == elected[:, None]) & (kept != 0)
    count = agree.sum(1)
    return torch.where(count > 0, (kept * agree).sum(1) / count.clamp(min=1), torch.zeros_like(votes))


def _ties_zero_sum_stays_zero(kept):
    elected = torch.sign(kept.sum(1))
    agree = (torch.sign(kept) == elected[:, None]) & (kept != 0)
    count = agree.sum(1)
    return torch.where(count > 0, (kept * agree).sum(1) / count.clamp(min=1), torch.zeros_like(elected))


def _ties_keep_exactly_k(C, top_k):
    L, T, p, q = C.shape
    k = rules.ties_keep_count(top_k, p * q)
    flat = C.reshape(L, T, -1)
    idx = flat.abs().topk(k, dim=-1).indices
    return (flat * torch.zeros_like(flat).scatter(-1, idx, 1.0)).reshape(C.shape)


def _dare_rescale(factor):
    def wrong(C, p, seed, layer_ids):
        return C if p == 0 else C * rules._dare_masks(C, p, seed, layer_ids) * factor(p)
    return wrong


def _dare_masks_ignoring_layer(C, p, seed, layer_ids):
    return rules.__dict__["_dare_masks_orig"](C, p, seed, [0] * len(layer_ids))


def _tsv_without_polar(C):
    L, T, p, q = C.shape
    k = rules.tsv_keep_count(min(p, q), T)
    U, S, Vh = torch.linalg.svd(C, full_matrices=False)
    Uc = U[..., :k].permute(0, 2, 1, 3).reshape(L, p, T * k)
    Vc = Vh[..., :k, :].mT.permute(0, 2, 1, 3).reshape(L, q, T * k)
    return (Uc * S[..., :k].reshape(L, 1, T * k)) @ Vc.mT


def _qr_orthonormalise(X):
    return torch.linalg.qr(X).Q if X.shape[-2] >= X.shape[-1] else X


def _iso_c_mean_over_all(C):
    U, S, Vh = torch.linalg.svd(C.sum(1), full_matrices=False)
    return (U * S.mean(-1, keepdim=True)[:, None, :]) @ Vh


def _iso_cts_common_scale(C):
    """Iso-CTS scaled by the mean of the common singular values only (the task ones left out)."""
    L, T, p, q = C.shape
    kc = min(p, q) - T
    out = rules.__dict__["_iso_cts_orig"](C)            # s * (orthonormal directions)
    common_mean = torch.linalg.svdvals(C.sum(1))[..., :kc].mean(-1)
    return out / torch.linalg.svdvals(out)[..., :1, None] * common_mean[:, None, None]


def _iso_cts_no_check(C):
    L, T, p, q = C.shape
    if T >= min(p, q):
        return C.sum(1)
    return rules.__dict__["_iso_cts_orig"](C)


def _weights_mean_over_all(nu, beta):
    mean = nu.mean()
    return torch.where(nu > 0, (beta * nu + (1 - beta) * mean) / torch.where(nu > 0, nu, 1.0), 0.0)


def _weights_beta_swapped(nu, beta):
    return reference.__dict__["_subspace_weights_orig"](nu, 1.0 - beta)


def _patch_weights(monkeypatch, fn):
    monkeypatch.setattr(reference, "_subspace_weights_orig", reference.subspace_weights, raising=False)
    monkeypatch.setattr(reference, "subspace_weights", fn)
    monkeypatch.setattr(engine, "subspace_weights", fn)


MUTATIONS = {
    # name: (rule, known answer that must fail, patch)
    "sum divides by T": ("sum", "sum_mean", lambda mp: _replace_rule(mp, "sum", lambda C: C.mean(1))),
    "mean over nonzero adapters": ("mean", "sum_mean", lambda mp: _replace_rule(
        mp, "mean", lambda C: C.sum(1) / (C.flatten(2).abs().sum(-1) > 0).sum(1).clamp(min=1)[:, None, None])),
    "ties keeps floor(top_k d)": ("ties", "ties_keep_count", lambda mp: mp.setattr(
        rules, "ties_keep_count", lambda k, d: max(1, math.floor(k * d)))),
    "ties keeps int(top_k d) + 1 (paper's code)": ("ties", "ties_keep_count", lambda mp: mp.setattr(
        rules, "ties_keep_count", lambda k, d: d if k >= 1 else int(d * k) + 1)),
    "ties keeps exactly k (threshold ties dropped)": ("ties", "ties_threshold_ties", lambda mp: mp.setattr(
        rules, "_trim", _ties_keep_exactly_k)),
    "ties divides by T": ("ties", "ties_election_and_divisor", lambda mp: mp.setattr(
        rules, "_elect_disjoint_mean", _ties_divide_by_T)),
    "ties elects by count": ("ties", "ties_election_and_divisor", lambda mp: mp.setattr(
        rules, "_elect_disjoint_mean", _ties_count_election)),
    "ties zero sum elects nothing": ("ties", "ties_election_and_divisor", lambda mp: mp.setattr(
        rules, "_elect_disjoint_mean", _ties_zero_sum_stays_zero)),
    "ties trims after electing (trim ignored)": ("ties", "ties_trim_then_elect", lambda mp: mp.setattr(
        rules, "_trim", lambda C, k: C)),
    "dare rescales by 1/p": ("dare", "dare_rescale", lambda mp: mp.setattr(
        rules, "_dare", _dare_rescale(lambda p: 1 / p))),
    "dare does not rescale": ("dare", "dare_rescale", lambda mp: mp.setattr(
        rules, "_dare", _dare_rescale(lambda p: 1.0))),
    "dare mask ignores the layer": ("dare", "dare_seed_and_layer", lambda mp: (
        mp.setattr(rules, "_dare_masks_orig", rules._dare_masks, raising=False),
        mp.setattr(rules, "_dare_masks", _dare_masks_ignoring_layer))),
    "dare layer stride 1": ("dare", "dare_seed_and_layer", lambda mp: mp.setattr(rules, "DARE_LAYER_STRIDE", 1)),
    "dare_ties rescales by 1/p": ("dare_ties", "dare_ties", lambda mp: mp.setattr(
        rules, "_dare", _dare_rescale(lambda p: 1 / p))),
    "dare_ties trims floor(top_k d)": ("dare_ties", "dare_ties", lambda mp: mp.setattr(
        rules, "ties_keep_count", lambda k, d: max(1, math.floor(k * d)))),
    "tsv keeps ceil(r/T)": ("tsv", "tsv_keep_count", lambda mp: mp.setattr(
        rules, "tsv_keep_count", lambda d, T: max(1, -(-d // T)))),
    "tsv keeps floor(r/T) without max(1, .)": ("tsv", "tsv_keep_count", lambda mp: mp.setattr(
        rules, "tsv_keep_count", lambda d, T: d // T)),
    "tsv without polar factor": ("tsv", "tsv_polar", lambda mp: _replace_rule(mp, "tsv", _tsv_without_polar)),
    "tsv orthonormalises by QR": ("tsv", "tsv_polar", lambda mp: mp.setattr(rules, "_polar", _qr_orthonormalise)),
    "iso_c mean over all singular values": ("iso_c", "iso_c", lambda mp: _replace_rule(
        mp, "iso_c", _iso_c_mean_over_all)),
    "iso_cts scale from the common part only": ("iso_cts", "iso_cts", lambda mp: (
        mp.setattr(rules, "_iso_cts_orig", rules.rule_iso_cts, raising=False),
        _replace_rule(mp, "iso_cts", _iso_cts_common_scale))),
    "iso_cts accepts T >= r": ("iso_cts", "iso_cts", lambda mp: (
        mp.setattr(rules, "_iso_cts_orig", rules.rule_iso_cts, raising=False),
        _replace_rule(mp, "iso_cts", _iso_cts_no_check))),
    "weights: mean over all adapters": ("weights", "subspace_weights", lambda mp: _patch_weights(
        mp, _weights_mean_over_all)),
    "weights: beta and 1 - beta swapped": ("weights", "subspace_weights", lambda mp: _patch_weights(
        mp, _weights_beta_swapped)),
    "engine weights: mean over all adapters": ("weights", "beta_end_to_end", lambda mp: _patch_weights(
        mp, _weights_mean_over_all)),
    "engine weights: beta and 1 - beta swapped": ("weights", "beta_end_to_end", lambda mp: _patch_weights(
        mp, _weights_beta_swapped)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_wrong_variant_is_caught(mutation, monkeypatch):
    _, check, patch = MUTATIONS[mutation]
    KNOWN[check]()                          # passes on the real rule ...
    patch(monkeypatch)
    with pytest.raises(AssertionError):     # ... and fails on the wrong variant
        KNOWN[check]()


def test_every_rule_has_a_caught_variant():
    assert {rule for rule, _, _ in MUTATIONS.values()} == set(rules.RULES) | {"weights"}


@pytest.mark.parametrize("method, params, bad", [
    ("ties", {"top_k": 0}, "top_k=0"), ("ties", {"top_k": 0.0}, "top_k=0.0"), ("ties", {"top_k": 1.01}, "top_k=1.01"),
    ("dare_ties", {"top_k": 0}, "top_k=0"), ("dare", {"p": 1.0}, "p=1.0"), ("dare", {"p": -0.1}, "p=-0.1"),
    ("dare", {"seed": -1}, "seed=-1"), ("dare", {"seed": 1.5}, "seed=1.5"), ("dare", {"seed": True}, "seed=True"),
    ("dare_ties", {"normalize": 1}, "normalize=1"),
], ids=["ties-top_k-0", "ties-top_k-0.0", "ties-top_k-above-1", "dare_ties-top_k-0", "dare-p-1", "dare-p-negative",
        "dare-seed-negative", "dare-seed-float", "dare-seed-bool", "dare_ties-normalize-int"])
def test_parameters_outside_their_range_are_refused(method, params, bad):
    """Each parameter's declared range, ends included or not as documented: top_k in (0, 1] (top_k = 0
    would silently keep one entry per task), p in [0, 1), seed a non-negative int, normalize a bool."""
    with pytest.raises(ValueError, match=rf"method '{method}': {bad} is invalid"):
        rules.resolve_params(method, params)
    assert rules.resolve_params("ties", {"top_k": 1.0})["top_k"] == 1.0
    assert rules.resolve_params("dare", {"p": 0.0, "seed": 0}) == {"p": 0.0, "seed": 0}
