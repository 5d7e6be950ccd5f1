"""Triton kernel of ``ops.gram``: both Gram matrices of a batch of layers in one launch.

Program ``(tile, layer, split)``: tiles ``0 .. n_tiles-1`` are the upper block triangle of
``G_B`` (reduction over ``m``), the next ``n_tiles`` those of ``G_A`` (reduction over
``n``). An off-diagonal tile is stored twice (as itself and mirrored), so only
``nb (nb + 1) / 2`` of the ``nb^2`` tiles are computed. When ``R <= 128`` the whole
``R x R`` Gram is one tile and every factor element is read exactly once; above that,
each column panel is read by the ``nb`` tiles of its block row.

The per-column scale of ``B`` is folded in as ``s_i s_j`` on the accumulated tile
(one multiply per output element instead of one per input element).

When layers x tiles are too few to fill the GPU, the reduction dimension is split over
``split`` programs that write partial Grams to a workspace, summed afterwards in a
fixed order (deterministic, unlike atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ._common import pow2

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _store_sym(ptr, acc, offs_i, offs_j, R, s_i, s_j, MIRROR: tl.constexpr):
    """Store tile ``acc`` at ``(offs_i, offs_j)`` and, off the diagonal (MIRROR), at
    ``(offs_j, offs_i)``; a diagonal tile is symmetrised, so the Gram is exactly symmetric."""
    mask = (offs_i[:, None] < R) & (offs_j[None, :] < R)
    if not MIRROR:
        # a diagonal tile: its two triangles were summed in different orders
        acc = 0.5 * (acc + tl.trans(acc))
    val = acc.to(ptr.dtype.element_ty)
    tl.store(ptr + offs_i[:, None] * s_i + offs_j[None, :] * s_j, val, mask=mask)
    if MIRROR:
        tl.store(ptr + offs_j[None, :] * s_i + offs_i[:, None] * s_j, val, mask=mask)


@triton.jit
def _gram_kernel(
    B, A, S, G, tiles,
    m, n, R, n_tiles, m_per_split, n_per_split,
    sBl, sBm, sBr, sAl, sAr, sAn, sSl, sSr,
    sGs, sGw, sGl, sGi, sGj,
    HAS_SCALE: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    lay = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    which = pid // n_tiles                       # 0: G_B, 1: G_A
    t = pid - which * n_tiles
    bi = tl.load(tiles + 2 * t)
    bj = tl.load(tiles + 2 * t + 1)
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    in_i = offs_i < R
    in_j = offs_j < R
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    out = G + sp.to(tl.int64) * sGs + which * sGw + lay * sGl
    if which == 0:
        k_lo = sp * m_per_split
        k_hi = tl.minimum(k_lo + m_per_split, m)
        base = B + lay * sBl
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_k = k + ks
            in_k = offs_k < k_hi
            xi = tl.load(base + offs_k[:, None] * sBm + offs_i[None, :] * sBr,
                         mask=in_k[:, None] & in_i[None, :], other=0.0)          # [BLOCK_K, BLOCK]
            if UPCAST:
                xi = xi.to(ACC)
            if SINGLE:
                xj = xi
            else:
                xj = tl.load(base + offs_k[:, None] * sBm + offs_j[None, :] * sBr,
                             mask=in_k[:, None] & in_j[None, :], other=0.0)
                if UPCAST:
                    xj = xj.to(ACC)
            acc += tl.dot(tl.trans(xi), xj, input_precision=PRECISION, out_dtype=ACC)
        if HAS_SCALE:
            si = tl.load(S + lay * sSl + offs_i * sSr, mask=in_i, other=0.0).to(ACC)
            sj = tl.load(S + lay * sSl + offs_j * sSr, mask=in_j, other=0.0).to(ACC)
            acc = acc * si[:, None] * sj[None, :]
        if bi == bj:
            _store_sym(out, acc, offs_i, offs_j, R, sGi, sGj, False)
        else:
            _store_sym(out, acc, offs_i, offs_j, R, sGi, sGj, True)
    else:
        k_lo = sp * n_per_split
        k_hi = tl.minimum(k_lo + n_per_split, n)
        base = A + lay * sAl
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_k = k + ks
            in_k = offs_k < k_hi
            yi = tl.load(base + offs_i[:, None] * sAr + offs_k[None, :] * sAn,
                         mask=in_i[:, None] & in_k[None, :], other=0.0)          # [BLOCK, BLOCK_K]
            if UPCAST:
                yi = yi.to(ACC)
            if SINGLE:
                yj = yi
            else:
                yj = tl.load(base + offs_j[:, None] * sAr + offs_k[None, :] * sAn,
                             mask=in_j[:, None] & in_k[None, :], other=0.0)
                if UPCAST:
                    yj = yj.to(ACC)
            acc += tl.dot(yi, tl.trans(yj), input_precision=PRECISION, out_dtype=ACC)
        if bi == bj:
            _store_sym(out, acc, offs_i, offs_j, R, sGi, sGj, False)
        else:
            _store_sym(out, acc, offs_i, offs_j, R, sGi, sGj, True)


_tile_cache: dict[tuple[int, str], torch.Tensor] = {}


def _tiles(nb: int, device) -> torch.Tensor:
    """``[nb (nb + 1) / 2, 2]`` int32 block coordinates ``(i, j)``, ``i <= j``."""
    key = (nb, str(device))
    if key not in _tile_cache:
        ij = [(i, j) for i in range(nb) for j in range(i, nb)]
        _tile_cache[key] = torch.tensor(ij, dtype=torch.int32, device=device)
    return _tile_cache[key]


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def gram_triton(B, A, scale, out_dtype, *, precision="ieee", split=None, block=None, block_k=None, out=None):
    """B ``[L, m, R]``, A ``[L, R, n]``, scale ``[L, R]`` or None ->
    (G_B ``[L, R, R]``, G_A ``[L, R, R]``) in ``out_dtype`` (float32 or float64, also the
    accumulation dtype). ``out``: optional ``[2, L, R, R]`` buffer to write into (must be
    fully overwritten; the tests poison it with NaN). ``split``/``block``/``block_k`` override
    the launch heuristics."""
    L, m, R = B.shape
    n = A.shape[2]
    dev = B.device
    acc = _TL_DTYPES[out_dtype]
    if block is None:
        block = pow2(R) if R <= 128 else 64
    if block_k is None:
        block_k = 32 if block >= 128 else 64
    nb = triton.cdiv(R, block)
    tiles = _tiles(nb, dev)
    n_tiles = tiles.shape[0]
    programs = 2 * n_tiles * L
    if split is None:
        # about four programs per SM; each split keeps at least 4 K-steps of work
        want = triton.cdiv(4 * _num_sms(dev), programs)
        split = max(1, min(want, triton.cdiv(max(m, n), 4 * block_k)))
    m_per = triton.cdiv(triton.cdiv(m, split), block_k) * block_k
    n_per = triton.cdiv(triton.cdiv(n, split), block_k) * block_k
    if split == 1:
        G = out if out is not None else torch.empty((2, L, R, R), dtype=out_dtype, device=dev)
        Gs = G.unsqueeze(0)
    else:
        Gs = torch.empty((split, 2, L, R, R), dtype=out_dtype, device=dev)
    S = scale if scale is not None else B  # placeholder pointer, never read without HAS_SCALE
    sS = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    # interpreter: tl.dot on bf16/fp16 operands is unreliable there, so tiles are cast first;
    # on the GPU fp16/bf16 products are exact in fp32, float32 follows `precision`.
    upcast = _backend.interpreting() or B.dtype == torch.float64 or out_dtype == torch.float64
    prec = precision if (B.dtype == torch.float32 or upcast) and out_dtype == torch.float32 else "ieee"
    grid = (2 * n_tiles, L, split)
    _gram_kernel[grid](
        B, A, S, Gs, tiles,
        m, n, R, n_tiles, m_per, n_per,
        B.stride(0), B.stride(1), B.stride(2), A.stride(0), A.stride(1), A.stride(2), sS[0], sS[1],
        Gs.stride(0), Gs.stride(1), Gs.stride(2), Gs.stride(3), Gs.stride(4),
        HAS_SCALE=scale is not None, SINGLE=nb == 1, BLOCK=block, BLOCK_K=block_k,
        ACC=acc, UPCAST=upcast, PRECISION=prec,
        num_warps=8 if block >= 128 else 4,
    )
    if split > 1:
        G = Gs.sum(0) if out is None else torch.sum(Gs, 0, out=out)
    return G[0], G[1]
