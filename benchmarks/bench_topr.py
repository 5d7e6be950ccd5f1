"""The top-r eigensolve of a HOOI half-step in isolation: dense (``Z Z^T`` and a full eigh)
against the factored block Krylov of ``ops/topr.py``, and the CPU rates behind the engine's
cost model (``ops/topr.py``: GEMM_FLOPS, NARROW_FLOPS, EIGH_S_PER_K3).

For each (kind, m, T) a real half-step is built: the layer's whitened sides, the HOSVD start
and the first half-step image ``Z [k, T r]`` (k = min(m, T r)); the factored route starts
from the HOSVD basis like the engine's first half-step, and from the dense answer plus a
1e-4 perturbation (a late sweep), and from seeded random vectors (as the HOSVD init does).
Both routes' answers are compared (sine of the largest principal angle). One thread, medians
of ``--repeat``.

    python benchmarks/bench_topr.py                       # k = 512, 1024, 2048; p = k and 4k
    python benchmarks/bench_topr.py --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctm_kernels import engine  # noqa: E402
from ctm_kernels.ops import topr  # noqa: E402
from ctm_kernels.reference import subspace_weights  # noqa: E402
from benchmarks.bench_layer import make_adapters  # noqa: E402
from benchmarks.common import header, median_time, table, write_json  # noqa: E402


def rates(k, repeat):
    """Measured rates at size k against the cost model's constants."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        Z = torch.randn(1, k, k, generator=g, dtype=dtype)
        M = Z @ Z.mT + k * torch.eye(k, dtype=dtype)
        X24, X120 = torch.randn(1, k, 24, dtype=dtype), torch.randn(1, k, 120, dtype=dtype)
        name = str(dtype).split(".")[-1]
        gemm = median_time(lambda: Z @ Z.mT, repeat=repeat)
        out[f"gemm_gflops_{name}"] = 2 * k ** 3 / gemm / 1e9
        for w, X in ((24, X24), (120, X120)):
            t = median_time(lambda: Z.mT @ X, repeat=repeat)
            out[f"narrow{w}_gflops_{name}"] = 2 * k * k * w / t / 1e9
        out[f"eigh_s_per_k3_{name}"] = median_time(lambda: torch.linalg.eigh(M), repeat=max(1, repeat // 2)) / k ** 3
    return out


def half_step_case(kind, m, T, r=16):
    A, B = make_adapters(kind, m, m, T, r, torch.float32, "cpu")
    Bh = torch.stack([torch.cat(B, 1)]).double()
    Ah = torch.stack([torch.cat(A, 0)]).double()
    rtol = engine.WHITEN_RTOL[torch.float64]
    R = T * r
    if R <= m:
        def side(F):
            return engine._whiten_inner(F.mT @ F, T, rtol)
    else:
        def side(F):
            return engine._whiten_outer(F, T, rtol)
    sb, sa = side(Bh), side(Ah.mT)
    nu = (sb.blocks * sa.blocks).sum((-2, -1)).sqrt()
    c = subspace_weights(nu[0], 0.0)[None]
    U = engine._hosvd(sb, sa.blocks, c, r, engine.DEFAULT_SOLVER)
    V = engine._hosvd(sa, sb.blocks, c, r, engine.DEFAULT_SOLVER)
    cc = c.repeat_interleave(r, dim=1)[:, None, :]
    Z = engine.half_step_images(sb.Rf, sa.Rf * cc, V, T).dense()
    return Z, U


def sin_angle(U, V):
    return float(torch.linalg.matrix_norm(V - U @ (U.mT @ V), ord=2).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="512,1024,2048")
    p.add_argument("--p-per-k", default="1,4", help="T r as multiples of m")
    p.add_argument("--kinds", default="structured,gaussian")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        a.m, a.p_per_k, a.kinds, a.repeat = "256", "1", "structured", 1
    rows, rate_rows = [], []
    for m in map(int, a.m.split(",")):
        rate_rows.append({"k": m, **rates(m, a.repeat)})
        print(table(rate_rows[-1:], list(rate_rows[-1])), flush=True)
        for kind in a.kinds.split(","):
            for mult in map(int, a.p_per_k.split(",")):
                T = mult * m // 16
                Z, U0 = half_step_case(kind, m, T)
                k, pp = Z.shape[1:]
                dense_t = median_time(lambda: topr.top_r_dense(Z, 16), repeat=a.repeat, warmup=0)
                w, Ud = topr.top_r_dense(Z, 16)
                near = Ud + 1e-4 * torch.randn(Ud.shape, generator=torch.Generator().manual_seed(1), dtype=Ud.dtype)
                row = {"kind": kind, "m": m, "T": T, "k": k, "p": pp, "dense_s": dense_t,
                       "model_dense_s": topr.dense_seconds(k, pp, Z.dtype),
                       "model_step_s": topr.factored_step_seconds(k, pp, 16 + topr.GUARD, topr.DEPTH, Z.dtype),
                       "spread": float(w[0, 0] / w[0, -1])}
                for start, X0 in (("cold", None), ("hosvd", U0), ("near", near)):
                    out = {}
                    t = median_time(lambda: out.update(res=topr.top_r_factored(Z, 16, X0, max_steps=200)),
                                    repeat=a.repeat, warmup=0)
                    _, Uf, steps, done = out["res"]
                    row.update({f"factored_{start}_s": t, f"factored_{start}_steps": int(steps.max()),
                                f"factored_{start}_sin_to_dense": sin_angle(Ud, Uf)})
                    row[f"factored_{start}_converged"] = bool(done.all())
                rows.append(row)
                print(table([row], list(row)), flush=True)
                path = write_json("topr_cpu" + ("_quick" if a.quick else "") + ".json",
                                  {**header(), "benchmark": "bench_topr", "args": vars(a), "rates": rate_rows,
                                   "rows": rows}, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
