"""Comparison helper of the op tests, on the suite's one tolerance table
(``tolerances.OP_RTOL``). Errors are max-abs relative, ``max |x - ref| / max |ref|``:
stricter than the Frobenius ratio where a kernel gets a few elements wrong (a tile edge,
an unwritten element). A check uses the loosest dtype involved (accumulation, output)."""
from __future__ import annotations

import torch

from tolerances import OP_RTOL


def rtol(*dtypes) -> float:
    return max(OP_RTOL[d] for d in dtypes)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    scale = ref.abs().max().clamp(min=1e-300)
    return ((x.double().cpu() - ref).abs().max() / scale).item()


def assert_close(x: torch.Tensor, ref: torch.Tensor, *dtypes, what: str = "") -> None:
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{what}: non-finite values (unwritten output?)"
    err, tol = rel_err(x, ref), rtol(*dtypes)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
