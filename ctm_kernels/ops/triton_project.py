"""Triton kernel of ``ops.project``: every coordinate block ``C_t`` of every layer in one launch.

Program ``(t, layer)`` forms ``X = Phi^T G_B[:, blk t]`` (``r x rb``) and
``Y = G_A[blk t, :] Psi`` (``rb x r``) in one pass over the ``R`` rows, then ``C_t = X Y``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _project_kernel(
    GB, GA, PHI, PSI, C,
    R, r, rb,
    sBl, sBi, sBj, sAl, sAi, sAj, sPl, sPk, sPr, sQl, sQk, sQr, sCl, sCt, sCi, sCj,
    BR: tl.constexpr, BRB: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    lay = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BR)
    in_r = offs_r < r
    loc_b = tl.arange(0, BRB)
    in_b = loc_b < rb
    offs_b = t * rb + loc_b
    ks = tl.arange(0, BK)
    X = tl.zeros((BR, BRB), dtype=ACC)
    Y = tl.zeros((BRB, BR), dtype=ACC)
    for k in range(0, R, BK):
        offs_k = k + ks
        in_k = offs_k < R
        phi = tl.load(PHI + lay * sPl + offs_k[:, None] * sPk + offs_r[None, :] * sPr,
                      mask=in_k[:, None] & in_r[None, :], other=0.0).to(ACC)          # [BK, BR]
        gb = tl.load(GB + lay * sBl + offs_k[:, None] * sBi + offs_b[None, :] * sBj,
                     mask=in_k[:, None] & in_b[None, :], other=0.0).to(ACC)           # [BK, BRB]
        X += tl.dot(tl.trans(phi), gb, input_precision=PRECISION, out_dtype=ACC)
        ga = tl.load(GA + lay * sAl + offs_b[:, None] * sAi + offs_k[None, :] * sAj,
                     mask=in_b[:, None] & in_k[None, :], other=0.0).to(ACC)           # [BRB, BK]
        psi = tl.load(PSI + lay * sQl + offs_k[:, None] * sQk + offs_r[None, :] * sQr,
                      mask=in_k[:, None] & in_r[None, :], other=0.0).to(ACC)          # [BK, BR]
        Y += tl.dot(ga, psi, input_precision=PRECISION, out_dtype=ACC)
    Ct = tl.dot(X, Y, input_precision=PRECISION, out_dtype=ACC)                       # [BR, BR]
    tl.store(C + lay * sCl + t * sCt + offs_r[:, None] * sCi + offs_r[None, :] * sCj,
             Ct.to(C.dtype.element_ty), mask=in_r[:, None] & in_r[None, :])


def project_triton(G_B, G_A, Phi, Psi, T, *, precision="ieee", block_k=None, out=None):
    """G_B, G_A ``[L, R, R]``, Phi, Psi ``[L, R, r]`` -> C ``[L, T, r, r]`` in the dtype of Phi
    (float32 or float64, also the accumulation dtype). ``out``: optional buffer to write into."""
    L, R, r = Phi.shape
    rb = R // T
    dt = Phi.dtype
    C = out if out is not None else torch.empty((L, T, r, r), dtype=dt, device=Phi.device)
    BR, BRB = pow2(r), pow2(rb)
    if block_k is None:
        block_k = 32 if max(BR, BRB) >= 128 else 64
    prec = precision if dt == torch.float32 else "ieee"
    _project_kernel[(T, L)](
        G_B, G_A, Phi, Psi, C,
        R, r, rb,
        G_B.stride(0), G_B.stride(1), G_B.stride(2), G_A.stride(0), G_A.stride(1), G_A.stride(2),
        Phi.stride(0), Phi.stride(1), Phi.stride(2), Psi.stride(0), Psi.stride(1), Psi.stride(2),
        C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        BR=BR, BRB=BRB, BK=block_k, ACC=_TL_DTYPES[dt], PRECISION=prec,
        num_warps=4,
    )
    return C
