"""The float64 reference's own pieces (ctm_kernels/reference.py) that the engine shares: the energy
test's estimate of what is left, known answers on windows where the plausible variants disagree."""
from __future__ import annotations

import math

import pytest
import torch

from ctm_kernels import reference as ref


def left(*changes):
    return float(ref.energy_left(torch.tensor(changes, dtype=torch.float64)))


def test_energy_left_takes_the_largest_ratio_of_the_window():
    """Changes 1e-3, 5e-4, 4e-4: ratios 0.5 and 0.8. The cautious estimate uses q = 0.8, the largest:
    4e-4 * 0.8 / 0.2 = 1.6e-3 still to come (the smallest ratio would say 4e-4, a geometric window
    cannot tell the two apart)."""
    assert left(1e-3, 5e-4, 4e-4) == pytest.approx(1.6e-3, rel=1e-12)
    assert left(4e-4, 3.2e-4, 1.6e-4) == pytest.approx(1.6e-4 * 0.8 / 0.2, rel=1e-12)   # largest ratio first
    assert left(-1e-3, -5e-4, -4e-4) == pytest.approx(1.6e-3, rel=1e-12)


def test_energy_left_needs_two_rounding_level_changes_to_end():
    """Only the last two changes both at float64 rounding (ENERGY_ROUNDING) mean nothing is left; one
    rounding-level change after steady ones, or before a real one, does not end the solve."""
    tiny = ref.ENERGY_ROUNDING / 10
    assert left(1e-3, 1e-3, tiny) == math.inf                 # not shrinking before it: no estimate
    assert left(1e-3, tiny, 5e-4) == math.inf                 # a real change after a rounding one
    assert left(1e-3, tiny, tiny) == 0.0
    assert left(math.nan, tiny, tiny) == 0.0                  # two rounding changes suffice, even early
    batch = torch.tensor([[1e-3, 1e-3, tiny], [1e-3, tiny, tiny], [1e-3, 5e-4, 4e-4]], dtype=torch.float64)
    assert ref.energy_left(batch).tolist() == [math.inf, 0.0, pytest.approx(1.6e-3, rel=1e-12)]


@pytest.mark.parametrize("method", ["sum", "ties"])
def test_reference_negative_scale_negates_the_merge(method):
    """``scale = -2`` gives minus the ``scale = 2`` update in the reference too (its factors carry the
    sign on B), on the dense reference and on the engine's ``reference`` backend."""
    import ctm_kernels as ck

    g = torch.Generator().manual_seed(0)
    A = [torch.randn(3, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    B = [torch.randn(7, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    dWs = ref.dense_updates(A, B)
    pos, neg = (ref.ctm(dWs, 4, method, scale=s, stop="subspace", tol=1e-12) for s in (2.0, -2.0))
    assert torch.allclose(neg.B @ neg.A, -(pos.B @ pos.A), atol=1e-12) and float(pos.dW.norm()) > 1
    assert torch.allclose(neg.dW, -pos.dW, atol=1e-12)
    out = ck.merge_layer(A, B, rank=4, method=method, scale=-2.0, backend="reference", stop="subspace", tol=1e-12)
    assert torch.allclose(out.B @ out.A, -(pos.B @ pos.A), atol=1e-10)
