"""Top-k eigenpairs of a p x p symmetric matrix on the CPU: a full ``torch.linalg.eigh`` against
LAPACK's partial solver (``ops.eig.partial_topk``: ``?syevr`` with an index range, one OpenBLAS
thread), as the engine's HOOI half-steps call them.

For each torch thread count, dtype, size p, spectrum and k: the matrix is ``M = Z Z^T`` with
``Z`` square and of full rank, as a half-step's (``p = T r`` columns): ``flat`` (gaussian
entries, as gaussian adapters give) or ``steep`` (singular values from 1 down to 1e-3, as
structured ones give). Matrices of low rank are not a stand-in: the full solver's divide and
conquer deflates their zero eigenvalues, and at rank p / 2 it ran up to 1.48x faster than on
these. The partial pairs are checked first against a float64 full decomposition (eigenvalues
relative to the largest, distance of the projectors onto the top-k subspace; a failed check
stops the run). Then both are timed alternately, each right after a torch product of the size
of ``Z Z^T`` (in the engine a solve always follows one, and torch's OpenMP workers are still
spinning then), medians of ``--repeat``. Writes JSON (machine,
versions, commit, date, rows) to benchmarks/results/partial_eigh_cpu.json or --out.

    python benchmarks/bench_partial_eigh.py              # full table (about 6 min on 2 cores)
    python benchmarks/bench_partial_eigh.py --quick      # p = 128, 256, one repeat
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, table, write_json  # noqa: E402
from ctm_kernels.ops import eig  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-4}     # projector distance, at these gaps


def psd(p, spectrum, dtype, seed):
    """``(Z Z^T, Z)``, ``[1, p, p]`` each: ``Z`` gaussian (``flat``) or with singular values
    from 1 down to 1e-3 (``steep``)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(1, p, p, generator=g, dtype=torch.float64)
    if spectrum == "steep":
        Z = Z * torch.logspace(0, -3, p, dtype=torch.float64)
    return (Z @ Z.mT).to(dtype), Z.to(dtype)


def check(M, k):
    """(eigenvalue error relative to the largest, projector distance) of the partial pairs."""
    w0, Q0 = torch.linalg.eigh(M.double())
    w0, Q0 = w0.flip(-1)[..., :k], Q0.flip(-1)[..., :k]
    w, Q = eig.partial_topk(M, k)
    Q = Q.double()
    ev = float((w.double() - w0).abs().max() / w0.abs().max())
    proj = float((Q @ Q.mT - Q0 @ Q0.mT).norm())
    if not proj <= TOL[M.dtype]:
        raise SystemExit(f"partial_topk disagrees with eigh at p={M.shape[-1]} k={k} {M.dtype}: projector {proj:.2e}")
    return ev, proj


def timed(fn, before):
    before()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,192,256,384,512,1024,2048")
    ap.add_argument("--ks", default="16,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--spectra", default="flat,steep")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.ks, a.spectra, a.repeat = "128,256", "16", "flat", 1
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype in (getattr(torch, d) for d in a.dtypes.split(",")):
            for p, spectrum in ((int(s), sp) for s in a.sizes.split(",") for sp in a.spectra.split(",")):
                M, Z = psd(p, spectrum, dtype, seed=p)
                product = lambda: (Z @ Z.mT).sum()                    # noqa: E731
                full = lambda: torch.linalg.eigh(M)                   # noqa: E731
                for k in (int(s) for s in a.ks.split(",")):
                    if 4 * k > p:       # a quarter of p and more: far past where the full solve wins
                        continue
                    ev, proj = check(M, k)
                    repeat = a.repeat if p <= 1024 else max(1, a.repeat // 3)
                    t_full, t_part = [], []
                    for _ in range(repeat):
                        t_full.append(timed(full, product))
                        t_part.append(timed(lambda: eig.partial_topk(M, k), product))
                    row = {"threads": threads, "dtype": str(dtype).replace("torch.", ""), "p": p,
                           "spectrum": spectrum, "k": k,
                           "full_ms": 1e3 * statistics.median(t_full), "partial_ms": 1e3 * statistics.median(t_part),
                           "eigval_err": ev, "proj_err": proj}
                    row["speedup"] = row["full_ms"] / row["partial_ms"]
                    rows.append(row)
                    print(table([row], list(row)), flush=True)
    print(table(rows, ["threads", "dtype", "p", "spectrum", "k", "full_ms", "partial_ms", "speedup", "proj_err"]))
    path = write_json("partial_eigh_cpu.json", {**header(), "args": vars(a), "rows": rows}, a.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
