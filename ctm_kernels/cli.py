"""The ``ctm`` command: ``ctm merge`` and ``ctm inspect``.

Exit status: 0 on success; 2 for bad input or usage (one line on stderr, no traceback);
1 for anything else (one line, ``ctm --traceback ...`` shows the traceback).

``torchrun --nproc_per_node=N -m ctm_kernels merge ...`` merges on N processes: the command
sets up the process group itself (gloo for CPU merges, nccl with ``--device cuda``, each rank
on the GPU of its local rank), shares the module groups out and writes one output from rank 0.
Only rank 0 prints; an error on any rank fails every rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line: reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the usage block and exits; one line and an exception instead
        raise UsageError(f"{self.prog}: {message}")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .api import DEFAULT_GROUP_BYTES, DTYPES, FORMATS
    from .io.kohya import DEFAULT_PREFIX
    from .rules import RULES

    p = _Parser(prog="ctm", description="Merge LoRA adapters into one low-rank adapter with "
                "Compress-then-Merge (CtM).")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an internal error")
    sub = p.add_subparsers(dest="command", metavar="{merge,inspect}", required=True)

    m = sub.add_parser("merge", help="merge adapters into one rank-R LoRA",
                       description="Merge LoRA adapters (PEFT folders or kohya .safetensors files) into "
                       "one rank-R LoRA. Methods: " + ", ".join(RULES) + ".")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folder or kohya .safetensors")
    m.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output: a PEFT adapter folder, or a .safetensors file with --format kohya")
    m.add_argument("--rank", type=int, required=True, metavar="R", help="rank of the merged LoRA")
    m.add_argument("--method", default="ties", metavar="M",
                   help=f"merge rule on the coordinates: {', '.join(RULES)} (default ties)")
    m.add_argument("--top-k", type=float, dest="top_k", metavar="F",
                   help="ties/dare_ties: share of entries each adapter keeps, in (0, 1]")
    m.add_argument("--p", type=float, metavar="F", help="dare/dare_ties: drop probability, in [0, 1)")
    m.add_argument("--seed", type=int, metavar="N", help="dare/dare_ties: seed of the drop masks")
    m.add_argument("--beta", type=float, default=0.0, metavar="F",
                   help="0 equalises the adapters' norms in the subspace search, 1 keeps them (default 0)")
    m.add_argument("--scale", type=float, default=1.0, metavar="F", help="global scale of the merged update")
    m.add_argument("--weights", type=_floats, metavar="W1,W2,...", help="one weight per adapter")
    m.add_argument("--stop", choices=["energy", "subspace"], default="energy",
                   help="when the subspace search ends: energy (default) when the energy kept, in total "
                        "and per adapter, has stopped changing; subspace when the subspaces have stopped "
                        "moving (the exact fixed point, reproducible across devices)")
    m.add_argument("--tol", type=float, default=None, metavar="F",
                   help="tolerance of the stop test: energy: largest change still expected of the "
                        "relative energy kept (default 1e-6); subspace: sine of the largest principal "
                        "angle of a step (default 1e-4)")
    m.add_argument("--max-iter", type=int, default=1000, dest="max_iter", metavar="N",
                   help="most subspace iterations per module (default 1000)")
    m.add_argument("--format", choices=FORMATS, default="peft", help="output format (default peft)")
    m.add_argument("--kohya-prefix", default=DEFAULT_PREFIX, metavar="P",
                   help=f"kohya name prefix for PEFT module paths (default {DEFAULT_PREFIX})")
    m.add_argument("--device", default=None, metavar="cpu|cuda", help="device of the merge (default cpu)")
    m.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="factor dtype of the merge and the output (default: the inputs')")
    m.add_argument("--max-group-mb", type=int, default=DEFAULT_GROUP_BYTES // 2**20, dest="max_group_mb",
                   metavar="MB", help="most input factor memory read at once (default %(default)s)")
    m.add_argument("--no-prefetch", action="store_false", dest="prefetch",
                   help="read each module group only when the previous one is merged (default: the next "
                   "group is read on a background thread while this one is merged)")
    m.add_argument("--report", metavar="FILE", help="write the merge report (share kept per adapter, "
                   "iterations, time, bytes and seconds read, peak memory) as JSON to FILE")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")

    i = sub.add_parser("inspect", help="list an adapter's modules, ranks, alphas, dtypes, parameters")
    i.add_argument("adapters", nargs="+", metavar="ADAPTER")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _cmd_merge(args) -> int:
    from .api import merge

    rule_params = {k: getattr(args, k) for k in ("top_k", "p", "seed") if getattr(args, k) is not None}
    if args.max_group_mb < 1:
        raise UsageError("ctm merge: --max-group-mb must be at least 1")
    if args.format == "kohya" and not args.output.endswith(".safetensors"):
        raise UsageError(f"ctm merge: with --format kohya the output is one file ending in .safetensors, "
                         f"got {args.output!r}")
    from pathlib import Path
    out = Path(args.output)
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise UsageError(f"ctm merge: {out}: already exists (use --overwrite to replace it)")
    if args.report is not None and not Path(args.report).resolve().parent.is_dir():
        raise UsageError(f"ctm merge: --report: no such directory for {args.report}")
    with _process_group(args.device) as (rank, device):
        result = merge(args.adapters, rank=args.rank, method=args.method, weights=args.weights, beta=args.beta,
                       scale=args.scale, stop=args.stop, tol=args.tol, max_iter=args.max_iter, device=device,
                       dtype=None if args.dtype == "auto" else args.dtype,
                       max_group_bytes=args.max_group_mb * 2**20, progress=not args.quiet and rank == 0,
                       output=out, format=args.format, overwrite=args.overwrite, kohya_prefix=args.kohya_prefix,
                       prefetch=args.prefetch, **rule_params)
    if rank == 0:
        if args.report is not None:
            Path(args.report).write_text(json.dumps(result.report(), indent=2) + "\n")
        if not args.quiet:
            print(result.summary())
            print(f"wrote {out} ({args.format})")
    return EXIT_OK


def _launched_ranks() -> tuple[int, int]:
    """``(rank, world size)`` set by torchrun (``(0, 1)`` otherwise)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


class _process_group:
    """Under torchrun (WORLD_SIZE > 1) and no process group yet: create one for the merge
    (nccl for a CUDA merge, each rank on the GPU of its LOCAL_RANK; gloo otherwise) and destroy
    it afterwards. Yields ``(rank, device)``."""

    def __init__(self, device):
        self.device = device
        self.created = False

    def __enter__(self):
        rank, world = _launched_ranks()
        if world <= 1:
            return 0, self.device
        import torch
        import torch.distributed as dist

        from .api import _check_device

        device = _check_device(self.device)          # a missing CUDA fails here, before any rendezvous
        if dist.is_initialized():
            return dist.get_rank(), device
        if device is not None and device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        self.created = True
        return dist.get_rank(), device

    def __exit__(self, *exc):
        if self.created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _cmd_inspect(args) -> int:
    from .api import inspect_adapter

    reports = [inspect_adapter(a) for a in args.adapters]
    if args.json:
        print(json.dumps(reports, indent=2))
        return EXIT_OK
    for rep in reports:
        ranks = sorted({m["rank"] for m in rep["modules"]})
        dtypes = sorted({m["dtype"] for m in rep["modules"]})
        print(f"{rep['label']}: {rep['format']}, {len(rep['modules'])} modules, ranks {ranks}, "
              f"dtypes {dtypes}, {rep['parameters']:,} parameters"
              + (", rsLoRA" if rep["use_rslora"] else "")
              + (f", base model {rep['base_model_name_or_path']}" if rep["base_model_name_or_path"] else ""))
        width = max(len(m["name"]) for m in rep["modules"])
        print(f"  {'module':<{width}}  {'kind':<9} {'out x in':>13} {'rank':>5} {'alpha':>8} {'scale':>8}  dtype")
        for m in rep["modules"]:
            print(f"  {m['name']:<{width}}  {m['kind']:<9} {m['out']:>6}x{m['in']:<6} {m['rank']:>5} "
                  f"{m['alpha']:>8g} {m['scale']:>8.4g}  {m['dtype']}")
        for key in rep["passthrough"]:
            print(f"  carries full tensor {key} (written unchanged to a PEFT output)")
    return EXIT_OK


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv=None) -> int:
    """Run ``ctm`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    show_tb = "--traceback" in (sys.argv[1:] if argv is None else argv)
    rank, world = _launched_ranks()
    # under torchrun every rank sees the same bad input, and an error on one rank is raised on
    # all of them naming that rank: rank 0 reports it, once
    speak = rank == 0
    try:
        args = build_parser().parse_args(argv)
        return _cmd_merge(args) if args.command == "merge" else _cmd_inspect(args)
    except SystemExit as e:                      # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except UsageError as e:
        if speak:
            print(_one_line(e), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:                      # bad input: adapters, rank, method, options
        if speak:
            print(f"ctm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ctm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anything else: one line, status 1
        if show_tb:
            traceback.print_exc()
        where = f"[rank {rank}] " if world > 1 else ""
        print(f"ctm: {where}internal error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
