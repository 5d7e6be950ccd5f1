"""Triton kernel of ``ops.lift``: both output factors of a batch of layers in one launch.

Programs ``0 .. ceil(m / BM) - 1`` of a layer write row tiles of ``B_out = (Bh * s) @ left``
(the scale is folded into the ``R x r`` left factor, not the ``m x R`` panel); the next
``ceil(n / BN)`` write column tiles of ``A_out = right @ Ah``. The factors are read once
(the second and last pass over them) and the outputs are written in the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _lift_kernel(
    B, A, S, LEFT, RIGHT, BO, AO,
    m, n, R, r, n_btiles,
    sBl, sBm, sBk, sAl, sAk, sAn, sSl, sSk, sLl, sLk, sLr, sRl, sRr, sRk,
    sOBl, sOBm, sOBr, sOAl, sOAr, sOAn,
    HAS_SCALE: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, VIA_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    lay = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BR)
    in_r = offs_r < r
    ks = tl.arange(0, BK)
    if pid < n_btiles:
        offs_m = pid * BM + tl.arange(0, BM)
        in_m = offs_m < m
        acc = tl.zeros((BM, BR), dtype=ACC)
        for k in range(0, R, BK):
            offs_k = k + ks
            in_k = offs_k < R
            b = tl.load(B + lay * sBl + offs_m[:, None] * sBm + offs_k[None, :] * sBk,
                        mask=in_m[:, None] & in_k[None, :], other=0.0).to(ACC)           # [BM, BK]
            lt = tl.load(LEFT + lay * sLl + offs_k[:, None] * sLk + offs_r[None, :] * sLr,
                         mask=in_k[:, None] & in_r[None, :], other=0.0).to(ACC)          # [BK, BR]
            if HAS_SCALE:
                s = tl.load(S + lay * sSl + offs_k * sSk, mask=in_k, other=0.0).to(ACC)
                lt = lt * s[:, None]
            acc += tl.dot(b, lt, input_precision=PRECISION, out_dtype=ACC)
        if VIA_F32:
            acc = acc.to(tl.float32)
        tl.store(BO + lay * sOBl + offs_m[:, None] * sOBm + offs_r[None, :] * sOBr,
                 acc.to(BO.dtype.element_ty), mask=in_m[:, None] & in_r[None, :])
    else:
        offs_n = (pid - n_btiles) * BM + tl.arange(0, BM)
        in_n = offs_n < n
        acc = tl.zeros((BR, BM), dtype=ACC)
        for k in range(0, R, BK):
            offs_k = k + ks
            in_k = offs_k < R
            rt = tl.load(RIGHT + lay * sRl + offs_r[:, None] * sRr + offs_k[None, :] * sRk,
                         mask=in_r[:, None] & in_k[None, :], other=0.0).to(ACC)          # [BR, BK]
            a = tl.load(A + lay * sAl + offs_k[:, None] * sAk + offs_n[None, :] * sAn,
                        mask=in_k[:, None] & in_n[None, :], other=0.0).to(ACC)           # [BK, BM]
            acc += tl.dot(rt, a, input_precision=PRECISION, out_dtype=ACC)
        if VIA_F32:
            acc = acc.to(tl.float32)
        tl.store(AO + lay * sOAl + offs_r[:, None] * sOAr + offs_n[None, :] * sOAn,
                 acc.to(AO.dtype.element_ty), mask=in_r[:, None] & in_n[None, :])


def lift_triton(B, A, scale, left, right, out_dtype, *, compute_dtype=None, precision="ieee",
                block_m=None, block_k=None, out=None):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]`` or None, left ``[L, R, r]``,
    right ``[L, r, R]`` -> (B_out ``[L, m, r]``, A_out ``[L, r, n]``) in ``out_dtype``.
    Accumulates in ``compute_dtype`` (default: the dtype of ``left``, float32 or float64).
    ``out``: optional (B_out, A_out) buffers to write into."""
    L, m, R = B.shape
    n = A.shape[2]
    r = left.shape[2]
    dev = B.device
    cdt = compute_dtype or left.dtype
    if out is None:
        Bo = torch.empty((L, m, r), dtype=out_dtype, device=dev)
        Ao = torch.empty((L, r, n), dtype=out_dtype, device=dev)
    else:
        Bo, Ao = out
    BR = pow2(r)
    BM = block_m or (64 if BR <= 64 else 32)
    BK = block_k or (32 if cdt == torch.float64 else 64)
    n_b, n_a = triton.cdiv(m, BM), triton.cdiv(n, BM)
    S = scale if scale is not None else left   # placeholder pointer, never read without HAS_SCALE
    sS = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    prec = precision if cdt == torch.float32 else "ieee"
    _lift_kernel[(n_b + n_a, L)](
        B, A, S, left, right, Bo, Ao,
        m, n, R, r, n_b,
        B.stride(0), B.stride(1), B.stride(2), A.stride(0), A.stride(1), A.stride(2), sS[0], sS[1],
        left.stride(0), left.stride(1), left.stride(2), right.stride(0), right.stride(1), right.stride(2),
        Bo.stride(0), Bo.stride(1), Bo.stride(2), Ao.stride(0), Ao.stride(1), Ao.stride(2),
        HAS_SCALE=scale is not None, BM=BM, BR=BR, BK=BK, ACC=_TL_DTYPES[cdt], PRECISION=prec,
        # float64 -> 16-bit float goes through float32: the interpreter returns NaN for the
        # direct cast, and the double rounding changes at most the last bit of a tie
        VIA_F32=cdt == torch.float64 and out_dtype in (torch.float16, torch.bfloat16),
        num_warps=4,
    )
    return Bo, Ao
