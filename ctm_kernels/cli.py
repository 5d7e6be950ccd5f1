"""The ``ctm`` command: ``ctm merge``, ``ctm plan`` (the dry run) and ``ctm inspect``.

Exit status: 0 on success; 2 for bad input or usage (one line on stderr starting with
``ctm: error:``, no traceback, nothing written); 1 for anything else (one line,
``ctm --traceback ...`` shows the traceback); 130 on SIGINT and 143 on SIGTERM, after the
temporary output is removed. Output cut short by a closed pipe
(``ctm inspect --json ... | head -1``) ends quietly with status 141, as SIGPIPE would.

``torchrun --nproc_per_node=N -m ctm_kernels merge ...`` merges on N processes: the command
sets up the process group itself (gloo for CPU merges, nccl with ``--device cuda``, each rank
on the GPU of its local rank), shares the module groups out and writes one output from rank 0.
Only rank 0 prints; an error on any rank fails every rank.

torch is imported only once a command runs, so ``ctm --help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager

from . import __version__, options
from .options import SettingError, suggest
from .pipeline.config import load_config
from .pipeline.launch import launched_ranks, process_group

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PIPE = 0, 1, 2, 141


class UsageError(Exception):
    """Bad command line: reported in one line with exit status 2."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT, so that the same
    clean-up runs (the temporary output removed, nothing left at OUT)."""


def _on_sigterm(signum, frame):
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)       # --rank, never a guess from --ra
        super().__init__(*args, **kw)

    def error(self, message):
        # argparse prints the usage block and exits; one line and an exception instead
        if message.startswith("unrecognized arguments:"):
            flags = [s for a in self._actions for s in a.option_strings]
            for sub in self._subparsers._group_actions if self._subparsers else []:
                for p in getattr(sub, "choices", {}).values():
                    flags += [s for a in p._actions for s in a.option_strings]
            words = message.split(":", 1)[1].split()
            hints = [suggest(w.split("=")[0], flags) for w in words if w.startswith("-")]
            message += "".join(h for h in hints if h)
        elif "invalid choice:" in message and ("argument command" in message or "{merge,plan,inspect}" in message):
            word = message.split("invalid choice:", 1)[1].split("'")[1] if "'" in message else ""
            message += suggest(word, ("merge", "plan", "inspect"))
        sub = self.prog.removeprefix("ctm").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


def _text_type(parse):
    """A text parser of :mod:`.options` as an argparse ``type``: its ValueError is argparse's error."""
    def text_type(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text_type


def _switch(default):
    return argparse.BooleanOptionalAction if default else "store_true"


def _merge_options(m: argparse.ArgumentParser) -> None:
    """The options of ctm merge (every merge setting of :data:`.options.MERGE`, and how the
    command runs); ctm plan takes every one of them (a dry run of that command)."""
    m.add_argument("adapters", nargs="*", metavar="ADAPTER",
                   help="PEFT adapter folder, kohya .safetensors or Hugging Face Hub id (org/name[@revision])")
    m.add_argument("-c", "--config", metavar="FILE", help="YAML merge config (mergekit style: adapters with "
                   "weights, merge_method, parameters, rank, output); options given here override it")
    options.MERGE.add_arguments(m, _switch, _text_type)
    m.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="print the plan (as ctm plan) and write nothing")
    m.add_argument("--no-prefetch", action="store_false", dest="prefetch",
                   help="read each module group only when the previous one is merged (default: the next "
                   "group is read on a background thread while this one is merged)")
    m.add_argument("--report", metavar="FILE", help="write the merge report (share kept per adapter, "
                   "iterations, time, bytes and seconds read, peak memory; ctm plan: the plan) as JSON to FILE")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (ctm plan: "
                   "print only the problems)")
    m.add_argument("--json", action="store_true", help="machine-readable output (the plan, or the merge report)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ctm", description="Merge LoRA adapters into one low-rank adapter with "
                "Compress-then-Merge (CtM).")
    p.add_argument("--version", action="version", version=f"ctm {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an internal error")
    sub = p.add_subparsers(dest="command", metavar="{merge,plan,inspect}", parser_class=_Parser)

    m = sub.add_parser("merge", help="merge adapters into one rank-R LoRA",
                       description="Merge LoRA adapters (PEFT folders, kohya .safetensors files or Hub ids) into "
                       "one rank-R LoRA. Methods: " + ", ".join(options.METHODS) + ".")
    _merge_options(m)
    pl = sub.add_parser("plan", help="dry run: what a merge would do, reading no factor",
                        description="Print the modules, groups, rank per module, which adapters adapt which "
                        "modules, estimated memory and time, and every problem found, reading no factor. "
                        "Takes the options of ctm merge; exit status 2 when a problem is found.")
    _merge_options(pl)
    i = sub.add_parser("inspect", help="list an adapter's modules, ranks, alphas, dtypes, NaN/Inf factors; "
                       "describe adapters the merge refuses and why")
    i.add_argument("adapters", nargs="+", metavar="ADAPTER")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-values", action="store_false", dest="check_values",
                   help="read headers only (default: read the factors and report NaN/Inf)")
    return p


def _settings(args) -> tuple[dict, set[str]]:
    """The merge's keyword arguments (the config file's, then the options given) and the names
    of those that came from the config file."""
    kw = load_config(args.config) if args.config else {}
    if args.adapters:
        if args.config:
            raise UsageError(f"ctm: give the adapters in {args.config} or on the command line, not both")
        kw["adapters"] = list(args.adapters)
        kw.pop("weights", None)
    names = [o.name for o in options.MERGE.options if o.flags] + [p.name for p in options.MERGE.rule_parameters]
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    from_file = set(kw) - set(given)
    kw.update(given)
    if not kw.get("adapters"):
        raise UsageError("ctm: no adapters (give them on the command line or in --config)")
    if kw.get("rank") is None:
        raise UsageError("ctm: --rank is required (or rank: in --config)")
    if args.report is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.report))):
        raise UsageError(f"ctm: --report: no such directory for {args.report}")
    return kw, from_file


@contextmanager
def _naming_the_file(args, from_file: set[str]):
    """A bad value read from the config file is reported with the file and its key."""
    try:
        yield
    except SettingError as e:
        if e.name not in from_file:
            raise
        raise ValueError(f"{args.config}: {options.MERGE.by_name[e.name].key}: {e}") from None


def _cmd_plan(args, kw: dict, from_file: set[str]) -> int:
    from .api import plan_merge

    with _naming_the_file(args, from_file):
        plan = plan_merge(kw.pop("adapters"), **kw)
    if args.report is not None:
        with open(args.report, "w") as f:
            f.write(json.dumps(plan.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.quiet:
        for p in plan.problems:
            print(f"problem: {p}")
    else:
        print(plan.describe())
    return EXIT_USAGE if plan.problems else EXIT_OK


def _cmd_merge(args) -> int:
    kw, from_file = _settings(args)
    if args.dry_run:
        return _cmd_plan(args, kw, from_file)
    if kw.get("output") is None:
        raise UsageError("ctm: -o/--output is required (or output: in --config)")
    from .api import merge

    with _naming_the_file(args, from_file), process_group(kw.get("device")) as (rank, device):
        kw["device"] = device
        result = merge(kw.pop("adapters"), progress=not args.quiet and rank == 0, prefetch=args.prefetch, **kw)
    if rank == 0:
        if args.report is not None:
            with open(args.report, "w") as f:
                f.write(json.dumps(result.report(), indent=2) + "\n")
        if args.json:
            print(json.dumps(result.report(), indent=2))
        elif not args.quiet:
            print(result.summary())
            print(f"wrote {result.output} ({result.format})")
    return EXIT_OK


def _cmd_inspect(args) -> int:
    from .api import inspect_adapter

    reports = [inspect_adapter(a, check_values=args.check_values) for a in args.adapters]
    if args.json:
        print(json.dumps(reports, indent=2))
        return EXIT_OK
    for rep in reports:
        if not rep["mergeable"]:
            print(f"{rep['label']}: {rep['format']}, {len(rep['tensors'])} tensors; the merge refuses it: "
                  f"{rep['refused']}")
            for t in rep["tensors"]:
                print(f"  {t['key']}  {t['dtype']} {t['shape']}")
            continue
        ranks = sorted({m["rank"] for m in rep["modules"]})
        dtypes = sorted({m["dtype"] for m in rep["modules"]})
        n = len(rep["modules"])
        print(f"{rep['label']}: {rep['format']}, {n} module{'s' if n != 1 else ''}, ranks {ranks}, "
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
        for bad in rep.get("nonfinite", []):
            print(f"  {bad['key']}: {bad['nan']} NaN and {bad['inf']} Inf values (the merge refuses this adapter)")
    return EXIT_OK


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 500 else text[:497] + "..."


def main(argv=None) -> int:
    """Run ``ctm`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    show_tb = "--traceback" in argv
    rank, world = launched_ranks()
    # under torchrun every rank sees the same bad input, and an error on one rank is raised on
    # all of them naming that rank: rank 0 reports it, once
    speak = rank == 0
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_OK
        if args.command == "merge":
            return _cmd_merge(args)
        if args.command == "plan":
            return _cmd_plan(args, *_settings(args))
        return _cmd_inspect(args)
    except SystemExit as e:                      # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except BrokenPipeError:
        # the reader went away (| head): stop quietly; stdout's buffered rest would fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except UsageError as e:
        if speak:
            print(f"ctm: error: {_one_line(e).removeprefix('ctm: ')}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:                      # bad input: adapters, rank, method, options
        if speak:
            print(f"ctm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ctm: error: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("ctm: error: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - anything else: one line, status 1
        if show_tb:
            traceback.print_exc()
        where = f"[rank {rank}] " if world > 1 else ""
        print(f"ctm: error: {where}internal error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
