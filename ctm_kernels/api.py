"""``ctm_kernels.merge``: whole adapters in, one merged adapter out.

Adapters are opened lazily (headers and configs first, all validated before any factor is
read), the union of their modules is split into groups of same-shape modules whose factors
fit ``max_group_bytes``, and each group is read, merged by the engine
(:func:`ctm_kernels.merge_layers`, one batched problem per group) and dropped before the
next-but-one is read: a background thread reads the next group while the engine merges this
one, so at most two groups' factors (and the engine's working copies of one) are in memory.

With ``output=`` the merged tensors are written as their group finishes, into a temporary
folder (file) next to the output that is renamed when complete, so the merged adapter is
never held whole either. Under an initialised ``torch.distributed`` process group (``torchrun
-m ctm_kernels merge``) the groups are shared out between the ranks; every rank merges its
groups, the other ranks write theirs to part files and rank 0 assembles the one output, the
same bytes a single process writes with the same number of threads.
"""
from __future__ import annotations

import math
import os
import queue
import resource
import shutil
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .engine import merge_layers
from .io import (Adapter, AdapterError, LazyTensor, MergedModule, kohya_tensors, load_group, merged_config,
                 open_adapter, peft_tensors, plan_groups, plan_modules, write_kohya, write_peft)
from .io.kohya import DEFAULT_PREFIX
from .io.peft import WEIGHTS_NAME, write_config
from .io.stream import ReadStats, SafetensorsStore, SafetensorsWriter, atomic_dir, atomic_file
from .rules import resolve_params

# Input factor bytes per module group. The merge holds about 7x a group's bytes at its peak
# for bf16 factors on CPU (the group being read, the group being merged, the engine's stacked
# copy of it and its float64 working copies), so 256 MiB keeps whole-model merges near 2 GiB.
DEFAULT_GROUP_BYTES = 256 * 2**20
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
FORMATS = ("peft", "kohya")


@dataclass
class MergeStats:
    """Where a merge spent its time and how much it read. Under ``torch.distributed`` the
    counts and seconds are sums over the ranks and ``peak_rss_bytes`` is the largest rank's.

    ``read_seconds`` is the time inside the adapters' read calls, ``load_seconds`` that plus
    the finiteness checks and dtype conversions (both on the reader thread, overlapping the
    merge), ``wait_seconds`` the time the merge loop waited for a group to be read: the part of
    the reading that was not hidden behind merging."""

    groups: int = 0
    modules: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    load_seconds: float = 0.0
    wait_seconds: float = 0.0
    merge_seconds: float = 0.0
    write_seconds: float = 0.0
    world_size: int = 1
    peak_rss_bytes: int = 0

    def add(self, other: "MergeStats") -> None:
        for name in ("groups", "modules", "bytes_read", "read_seconds", "load_seconds", "wait_seconds",
                     "merge_seconds", "write_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)


@dataclass
class MergeResult:
    """A merged adapter: ``modules`` (factors per module), how it was made, and what it kept.

    ``energy_kept[t]`` is the share of adapter t's update (its ``sum ||dW_t||_F^2`` over the
    modules it adapts) that lies in the merged subspaces: per module the engine's
    ``energy_kept``, aggregated weighted by ``||dW_t||_F^2``.

    When the merge wrote its output (``output`` set), the modules' factors are meta tensors
    (shapes and dtypes only): the data is in the written file."""

    modules: list[MergedModule]
    rank: int
    method: str
    params: dict
    adapters: list[str]
    energy_kept: list[float]
    seconds: float
    inputs: list[Adapter] = field(repr=False, default_factory=list)
    stats: MergeStats = field(default_factory=lambda: MergeStats())
    output: Path | None = None
    format: str | None = None

    def __repr__(self) -> str:
        where = f", written to {str(self.output)!r}" if self.output is not None else ""
        return (f"MergeResult({len(self.modules)} modules, rank={self.rank}, method={self.method!r}, "
                f"adapters={len(self.adapters)}{where})")

    def _check_in_memory(self) -> None:
        if any(mm.A.is_meta for mm in self.modules):
            raise ValueError(f"the merged factors were written to {self.output} and not kept in memory; "
                             "merge without output= to get them as tensors")

    # -- what PEFT would load -----------------------------------------------------------------

    def config(self) -> dict:
        """The ``adapter_config.json`` of the PEFT output."""
        return merged_config(self.modules, self.rank, self.inputs)

    def _passthrough(self) -> dict[str, LazyTensor]:
        """Full tensors PEFT stores with an embedding LoRA (its base weights); every input that
        carries one must carry the same values, which the output then carries unchanged."""
        holders: dict[str, list[Adapter]] = {}
        for ad in self.inputs:
            for key in ad.passthrough:
                holders.setdefault(key, []).append(ad)
        out = {}
        for key, ads in holders.items():
            def load(key=key, ads=ads):
                ref = ads[0].store.get([key])[key]
                for other in ads[1:]:
                    t = other.store.get([key])[key]
                    if t.shape != ref.shape or not torch.equal(t, ref):
                        raise AdapterError(f"{other.label}: {key}: differs from the same tensor in "
                                           f"{ads[0].label}; the adapters disagree on the base weights")
                return ref
            st = ads[0].store
            out[key] = LazyTensor(st.dtype(key), st.shape(key), load)
        return out

    def state_dict(self, format: str = "peft", *, kohya_prefix: str = DEFAULT_PREFIX) -> dict[str, torch.Tensor]:
        """The merged adapter's tensors as PEFT (``base_model.model.<module>.lora_A.weight``...)
        or kohya (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) keys."""
        self._check_in_memory()
        if format == "peft":
            out = peft_tensors(self.modules)
            out.update({k: v.load() for k, v in self._passthrough().items()})
            return out
        if format == "kohya":
            self._check_kohya()
            return kohya_tensors(self.modules, kohya_prefix)
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")

    def _check_kohya(self):
        for key in self._passthrough():
            raise ValueError(f"{key}: full base weights (saved by PEFT with an embedding LoRA) have no "
                             "kohya representation; use the PEFT format")

    def metadata(self) -> dict[str, str]:
        return {"ctm_method": self.method, "ctm_rank": str(self.rank),
                "ctm_params": ",".join(f"{k}={v}" for k, v in sorted(self.params.items())),
                "ctm_adapters": str(len(self.adapters))}

    def _file_metadata(self, format: str) -> dict[str, str]:
        """The safetensors metadata of the written file."""
        if format == "peft":
            return {"format": "pt", **self.metadata()}
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.rank), **self.metadata()}

    def save(self, path: str | os.PathLike, format: str = "peft", *, overwrite: bool = False,
             kohya_prefix: str = DEFAULT_PREFIX) -> Path:
        """Write a PEFT adapter folder (``format="peft"``) or a kohya ``.safetensors`` file,
        atomically: nothing appears at ``path`` unless the whole output was written. The bytes
        are those ``merge(..., output=path)`` writes."""
        self._check_in_memory()
        if format == "peft":
            tensors = dict(peft_tensors(self.modules))
            tensors.update(self._passthrough())
            return write_peft(path, tensors, self.config(), overwrite=overwrite, metadata=self._file_metadata(format))
        if format == "kohya":
            self._check_kohya()
            return write_kohya(path, kohya_tensors(self.modules, kohya_prefix), overwrite=overwrite,
                               metadata=self._file_metadata(format))
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")

    # -- report ---------------------------------------------------------------------------------

    def summary(self) -> str:
        """A few lines: inputs, modules, rank, time, convergence, per-adapter share kept."""
        its = [mm.info.get("iterations", 0) for mm in self.modules]
        unconverged = sum(1 for mm in self.modules if not mm.info.get("converged", True))
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        lines = [
            f"merged {len(self.adapters)} adapters into {len(self.modules)} modules at rank {self.rank} "
            f"with {self.method}{f' ({params})' if params else ''} in {self.seconds:.2f} s",
            f"subspace iterations per module: mean {sum(its) / max(1, len(its)):.1f}, max {max(its, default=0)}"
            + (f"; {unconverged} modules stopped at max_iter before their stop test passed" if unconverged else ""),
            "share of each adapter's update kept in the merged subspace:",
        ]
        width = max(len(a) for a in self.adapters)
        for label, kept in zip(self.adapters, self.energy_kept):
            lines.append(f"  {label:<{width}}  {100 * kept:6.2f} %")
        st = self.stats
        procs = f" on {st.world_size} processes" if st.world_size > 1 else ""
        lines.append(f"{st.groups} module groups{procs}; read {st.bytes_read / 2**20:,.1f} MiB of factors in "
                     f"{st.read_seconds:.2f} s ({st.wait_seconds:.2f} s of merging waited on reads), "
                     f"peak RSS {st.peak_rss_bytes / 2**30:.2f} GiB")
        return "\n".join(lines)

    def report(self) -> dict:
        """The summary as plain data (what ``ctm merge --report`` writes)."""
        its = [mm.info.get("iterations", 0) for mm in self.modules]
        return {
            "adapters": list(self.adapters), "energy_kept": list(self.energy_kept), "rank": self.rank,
            "method": self.method, "params": dict(self.params), "modules": len(self.modules),
            "iterations_mean": sum(its) / max(1, len(its)), "iterations_max": max(its, default=0),
            "unconverged": sum(1 for mm in self.modules if not mm.info.get("converged", True)),
            "seconds": self.seconds, "output": None if self.output is None else str(self.output),
            "format": self.format, "stats": asdict(self.stats),
        }


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank


def _check_weights(weights, T: int) -> list[float]:
    if weights is None:
        return [1.0] * T
    vals = [float(w) for w in (weights.tolist() if torch.is_tensor(weights) else weights)]
    if len(vals) != T:
        raise ValueError(f"{len(vals)} weights for {T} adapters")
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"weights must be finite, got {v}")
    return vals


def _resolve_dtype(dtype, adapters: list[Adapter]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        out = None
        for ad in adapters:
            for s in ad.modules.values():
                out = s.dtype if out is None else torch.promote_types(out, s.dtype)
        return out
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in set(DTYPES.values()):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _check_device(device):
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def open_adapters(adapters: Sequence) -> list[Adapter]:
    """Open every adapter (headers and configs only)."""
    if isinstance(adapters, (str, os.PathLike, dict, tuple)) or not isinstance(adapters, Sequence):
        raise ValueError("adapters must be a list of paths, state dicts or (state_dict, config) pairs")
    if not adapters:
        raise ValueError("no adapters to merge")
    opened = [a if isinstance(a, Adapter) else open_adapter(a, label=f"adapter[{i}]")
              for i, a in enumerate(adapters)]
    return opened


def _merge_group(factors, group, first: int, weights: list[float], *, rank, method, params,
                 **engine_kw) -> list[MergedModule]:
    """Merge one group's factors (as :func:`~ctm_kernels.io.load_group` returns them) as one
    engine call; returns the merged modules (CPU, stored layout). ``first`` is the group's
    position among all modules."""
    layers = [([a for _, a, _, _ in mod], [b for _, _, b, _ in mod], [s for *_, s in mod]) for mod in factors]
    layer_w = [[weights[i] for i, *_ in mod] for mod in factors]
    # each module is identified by its position among all modules, so that its DARE mask is
    # the same whatever the group sizes (max_group_bytes) and whichever rank merges it
    out = merge_layers(layers, rank=rank, method=method, weights=layer_w, layer_ids=range(first, first + len(layers)),
                       **engine_kw, **params)
    del layers
    merged = []
    for e, res in zip(group, out):
        spec = e.first
        A, B = res.A.detach().to("cpu"), res.B.detach().to("cpu")
        if spec.kind == "conv":
            A = A.reshape(A.shape[0], *spec.a_shape[1:])
            B = B.reshape(B.shape[0], B.shape[1], *spec.b_shape[2:])
        info = res.info
        merged.append(MergedModule(e.name, spec.kind, A, B, {
            "iterations": info.iterations, "converged": info.converged, "energy_kept": list(info.energy_kept),
            "norms": list(info.norms), "adapters": [i for i, _ in e.specs]}))
    return merged


def _skeleton(entry, rank: int, dtype: torch.dtype) -> MergedModule:
    """The merged module ``entry`` will become, with meta tensors: names, shapes, dtypes."""
    s = entry.first
    A = torch.empty((rank, *s.a_shape[1:]), dtype=dtype, device="meta")
    B = torch.empty((s.b_shape[0], rank, *s.b_shape[2:]), dtype=dtype, device="meta")
    return MergedModule(entry.name, s.kind, A, B, {})


_END = object()


def _read_groups(load: Callable, groups: list, ahead: bool) -> Iterator[tuple[object, object, float]]:
    """Yield ``(group, load(group), seconds waited for it)`` in order.

    With ``ahead``, a background thread loads the next group while the caller works on the
    current one, and never more than one ahead: the group the caller holds and the one being
    read are the only ones in memory (the caller drops each group before asking for the next).
    Reads release the GIL (file reads, torch ops), so they overlap the merge's compute."""
    if not ahead:
        for g in groups:
            t0 = time.perf_counter()
            data = load(g)
            yield g, data, time.perf_counter() - t0
            del data
        return
    ready: queue.Queue = queue.Queue()
    slot = threading.Semaphore(1)           # taken by the reader per group, given back when the caller takes it
    stop = threading.Event()

    def reader():
        try:
            for g in groups:
                slot.acquire()
                if stop.is_set():
                    return
                ready.put((g, load(g), None))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            ready.put((None, None, e))
            return
        ready.put(_END)

    thread = threading.Thread(target=reader, name="ctm-group-reader", daemon=True)
    thread.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = ready.get()
            waited = time.perf_counter() - t0
            if item is _END:
                return
            g, data, err = item
            del item
            if err is not None:
                raise err
            slot.release()
            yield g, data, waited
            del data
    finally:
        stop.set()
        slot.release()
        thread.join()


def _share_groups(sizes: list[int], world: int) -> list[list[int]]:
    """Group indices per rank: largest groups first, each to the rank with the fewest bytes
    so far (ties to the lower rank); each rank's list in plan order. Deterministic."""
    load = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += sizes[i]
    return [sorted(o) for o in owned]


class _Ranks:
    """The processes of a merge: this one alone, or the current ``torch.distributed`` group."""

    def __init__(self, dist=None):
        self.dist = dist
        self.world = dist.get_world_size() if dist is not None else 1
        self.rank = dist.get_rank() if dist is not None else 0

    @classmethod
    def detect(cls, distributed) -> "_Ranks":
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        if distributed is False:
            return cls()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return cls(dist) if dist.get_world_size() > 1 else cls()
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group "
                             "(torch.distributed.init_process_group, or launch with torchrun)")
        return cls()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, by rank, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


def _failure(e: BaseException) -> tuple[str, str]:
    """What other ranks need to re-raise an error: its kind and its one-line message."""
    if isinstance(e, ValueError):
        return "value", str(e)
    return "internal", f"{type(e).__name__}: {e}"


def _relay(failures: list, own: BaseException | None) -> None:
    """Raise if any rank failed: this rank's own error, or else the first failed rank's."""
    if own is not None:
        raise own
    for r, f in enumerate(failures):
        if f is not None:
            kind, msg = f
            raise (ValueError if kind == "value" else RuntimeError)(f"rank {r}: {msg}")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if os.uname().sysname == "Darwin" else peak * 1024)   # bytes on macOS, KiB elsewhere


class _Job:
    """One rank's part of a merge: its groups, read ahead, merged, handed to ``emit``."""

    def __init__(self, opened, groups, firsts, mine, cdtype, weights, ranks, *, progress, prefetch, engine_kw):
        self.opened, self.groups, self.firsts, self.mine = opened, groups, firsts, mine
        self.cdtype, self.weights, self.ranks = cdtype, weights, ranks
        self.progress, self.prefetch, self.engine_kw = progress, prefetch, engine_kw
        self.reads = ReadStats()
        self.stats = MergeStats(world_size=ranks.world)

    def _load(self, gi: int):
        t0 = time.perf_counter()
        factors = load_group(self.opened, self.groups[gi], self.cdtype, self.reads)
        self.stats.load_seconds += time.perf_counter() - t0      # only the reader thread adds here
        return factors

    def run(self, emit: Callable[[MergedModule], None]) -> None:
        """Merge this rank's groups in order; ``emit`` gets every merged module as its group finishes."""
        bar = None
        if self.progress is True and self.ranks.rank == 0:
            from tqdm import tqdm
            desc = "merging" if self.ranks.world == 1 else f"merging (rank 0 of {self.ranks.world})"
            bar = tqdm(total=len(self.mine), desc=desc, unit="group", disable=None)
        T = len(self.opened)
        groups = _read_groups(self._load, self.mine, self.prefetch)
        try:
            for done, (gi, factors, waited) in enumerate(groups, 1):
                group = self.groups[gi]
                spec = group[0].first
                desc = f"{len(group)} x {spec.kind} {spec.out_features}x{spec.in_features}"
                if bar is not None:        # the group being merged now, and what has been read so far
                    bar.set_postfix_str(f"{desc}, {T} adapters, read {self.reads.bytes / 2**20:,.1f} MiB")
                self.stats.wait_seconds += waited
                t0 = time.perf_counter()
                merged = _merge_group(factors, group, self.firsts[gi], self.weights, **self.engine_kw)
                del factors
                t1 = time.perf_counter()
                for mm in merged:
                    emit(mm)
                self.stats.merge_seconds += t1 - t0
                self.stats.write_seconds += time.perf_counter() - t1
                self.stats.groups += 1
                self.stats.modules += len(group)
                del merged
                if bar is not None:
                    bar.update(1)
                if callable(self.progress):
                    self.progress(done, len(self.mine), desc)
        finally:
            groups.close()
            if bar is not None:
                bar.close()
        self.stats.bytes_read = self.reads.bytes
        self.stats.read_seconds = self.reads.seconds
        self.stats.peak_rss_bytes = _peak_rss_bytes()


def _destination(stack: ExitStack, dest: Path, format: str, overwrite: bool) -> Path:
    """The temporary weights file of the output ``dest``, renamed into place when ``stack`` closes
    without an error (removed otherwise)."""
    if format == "peft":
        return stack.enter_context(atomic_dir(dest, overwrite=overwrite)) / WEIGHTS_NAME
    if dest.suffix != ".safetensors":
        raise ValueError(f"{dest}: a kohya LoRA is one file; give a path ending in .safetensors")
    return stack.enter_context(atomic_file(dest, overwrite=overwrite))


def _write_output(job: _Job, result: MergeResult, dest: Path, overwrite: bool, tensors_of: Callable
                  ) -> dict[str, dict]:
    """Run ``job`` writing the merged tensors into the output ``dest`` as their groups finish;
    returns every module's info (all ranks').

    Rank 0 writes into the output's temporary weights file directly; the other ranks write
    part files in a temporary folder next to the output that rank 0 copies in, tensor by
    tensor, once every rank is done. Every failure is raised on every rank, and leaves
    nothing at ``dest``."""
    ranks = job.ranks
    fmt = result.format
    layout = tensors_of(result.modules)
    if fmt == "peft":
        layout.update(result._passthrough())
    infos: dict[str, dict] = {}
    reached_end = False
    err = None
    try:
        with ExitStack() as stack:
            # rank 0 sets up the temporary output (and the part folder) and tells the others
            own, setup, parts, writer = None, None, None, None
            if ranks.rank == 0:
                try:
                    final = _destination(stack, dest, fmt, overwrite)
                    writer = stack.enter_context(SafetensorsWriter(final, layout, result._file_metadata(fmt)))
                    if ranks.world > 1:
                        parts = Path(tempfile.mkdtemp(prefix=f".{dest.name}.parts-", dir=dest.parent))
                        stack.callback(shutil.rmtree, parts, True)
                except Exception as e:
                    if ranks.world == 1:
                        raise
                    own, setup = e, _failure(e)
            parts_name, setup = ranks.broadcast((None if parts is None else str(parts), setup))
            _relay([setup], own)

            def emit(mm):
                infos[mm.name] = mm.info
                for key, t in tensors_of([mm]).items():
                    writer.write(key, t)

            own = None
            try:
                if ranks.rank != 0:
                    skeletons = {mm.name: mm for mm in result.modules}
                    mine = [skeletons[e.name] for gi in job.mine for e in job.groups[gi]]
                    path = Path(parts_name) / f"part-{ranks.rank:05d}.safetensors"
                    writer = stack.enter_context(SafetensorsWriter(path, tensors_of(mine)))
                job.run(emit)
                if ranks.rank != 0:
                    writer.close()
            except Exception as e:
                if ranks.world == 1:
                    raise
                own = e
            gathered = ranks.gather((None if own is None else _failure(own), infos, job.stats))
            _relay([f for f, *_ in gathered], own)
            for r, (_, their_infos, their_stats) in enumerate(gathered):
                if r != ranks.rank:
                    infos.update(their_infos)
                    job.stats.add(their_stats)
            reached_end = True
            if ranks.rank == 0:
                t0 = time.perf_counter()
                for r in range(1, ranks.world):
                    part = SafetensorsStore(Path(parts_name) / f"part-{r:05d}.safetensors")
                    for key in part.keys():
                        writer.write(key, part.get([key])[key])
                for key, t in layout.items():
                    if isinstance(t, LazyTensor):
                        writer.write(key, t.load())
                writer.close()
                if fmt == "peft":
                    write_config(final.parent, result.config())
                job.stats.write_seconds += time.perf_counter() - t0
    except Exception as e:
        if not reached_end or ranks.world == 1:
            raise
        err = e
    if ranks.world > 1:
        # every rank returns once the output is in place (or raises when it is not)
        status = ranks.broadcast(None if err is None or ranks.rank != 0 else _failure(err))
        if err is not None:
            raise err
        _relay([status], None)
    return infos


def merge(adapters: Sequence, *, rank: int, method: str = "ties", weights=None, beta: float = 0.0,
          scale: float = 1.0, stop: str = "energy", tol: float | None = None, max_iter: int = 1000,
          device=None, dtype=None,
          max_group_bytes: int = DEFAULT_GROUP_BYTES, progress: bool | Callable | None = False,
          output: str | os.PathLike | None = None, format: str = "peft", overwrite: bool = False,
          kohya_prefix: str = DEFAULT_PREFIX, prefetch: bool = True, distributed: bool | None = None,
          **rule_params) -> MergeResult:
    """Merge whole LoRA adapters into one rank-``rank`` LoRA with Compress-then-Merge.

    ``adapters``: paths (PEFT folders, kohya ``.safetensors``), kohya state dicts, or PEFT
    ``(state_dict, config)`` pairs. A module missing from an adapter gets nothing from it.
    ``weights``: one per adapter. ``rule_params``: the method's parameters (``top_k`` for
    ties, ``p`` and ``seed`` for dare...; see :data:`ctm_kernels.RULES`). ``dtype``: factor
    dtype for the merge and the output (default: the inputs', promoted). ``progress``: True
    for a tqdm bar over module groups, or a callable ``(done, total, group_description)``.
    ``prefetch``: read the next group on a background thread while merging this one.

    ``output``: write the merged adapter there (a PEFT folder, or with ``format="kohya"`` a
    ``.safetensors`` file) as the groups finish, atomically; the result's modules then hold
    no factor data. Without it the merged factors are returned in memory.

    ``distributed``: None uses the ``torch.distributed`` process group when one is
    initialised with more than one rank, False ignores it, True requires it. Every rank must
    call ``merge`` with the same arguments; the module groups are shared out between the
    ranks, rank 0 writes ``output`` (the same bytes as one process with as many threads), and
    every rank returns the full result. The ranks must see one filesystem at ``output``.

    Bad input raises ``ValueError`` naming the file and key, before any factor is read where
    the headers and configs suffice."""
    t0 = time.perf_counter()
    params = resolve_params(method, rule_params)
    rank = _check_rank(rank)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    opened = open_adapters(adapters)
    w = _check_weights(weights, len(opened))
    entries = plan_modules(opened)
    for e in entries:
        s = e.first
        if rank > min(s.out_features, s.in_features):
            i, spec = e.specs[0]
            raise ValueError(f"{opened[i].label}: {spec.a_key}: rank {rank} exceeds min(m, n) = "
                             f"{min(s.out_features, s.in_features)} of module {e.name} "
                             f"({s.out_features}x{s.in_features})")
    cdtype = _resolve_dtype(dtype, opened)
    if isinstance(max_group_bytes, bool) or not isinstance(max_group_bytes, int) or max_group_bytes < 1:
        raise ValueError(f"max_group_bytes must be a positive integer, got {max_group_bytes!r}")
    device = _check_device(device)
    ranks = _Ranks.detect(distributed)
    groups = plan_groups(entries, max_group_bytes)
    firsts, k = [], 0                  # position of each group's first module in the order of the groups
    for g in groups:
        firsts.append(k)
        k += len(g)
    sizes = [sum(s.nbytes for e in g for _, s in e.specs) for g in groups]
    mine = _share_groups(sizes, ranks.world)[ranks.rank]

    result = MergeResult(modules=[_skeleton(e, rank, cdtype) for e in entries], rank=rank, method=method,
                         params=params, adapters=[a.label for a in opened], energy_kept=[], seconds=0.0,
                         inputs=opened, output=None if output is None else Path(output),
                         format=None if output is None else format)
    if format == "peft":
        tensors_of = peft_tensors
    else:
        tensors_of = lambda mods: kohya_tensors(mods, kohya_prefix)      # noqa: E731
        if output is not None:
            result._check_kohya()
            tensors_of(result.modules)          # embeddings and kohya name clashes fail here, before any read
    job = _Job(opened, groups, firsts, mine, cdtype, w, ranks, progress=progress, prefetch=prefetch,
               engine_kw=dict(rank=rank, method=method, params=params, beta=beta, scale=scale, stop=stop, tol=tol,
                              max_iter=max_iter, device=device))
    if output is not None:
        infos = _write_output(job, result, Path(output), overwrite, tensors_of)
        for mm in result.modules:
            mm.info = infos[mm.name]
    else:
        merged: list[MergedModule] = []
        own = None
        try:
            job.run(merged.append)
        except Exception as e:
            if ranks.world == 1:
                raise
            own = e
        gathered = ranks.gather((None if own is None else _failure(own), merged if own is None else [], job.stats))
        _relay([f for f, *_ in gathered], own)
        by_name = {}
        for r, (_, mods, st) in enumerate(gathered):
            by_name.update({mm.name: mm for mm in mods})
            if r != ranks.rank:
                job.stats.add(st)
        result.modules = [by_name[e.name] for e in entries]
    kept_num = [0.0] * len(opened)
    kept_den = [0.0] * len(opened)
    for mm in result.modules:
        for i, kept, nu in zip(mm.info["adapters"], mm.info["energy_kept"], mm.info["norms"]):
            kept_num[i] += kept * nu * nu
            kept_den[i] += nu * nu
    result.energy_kept = [kept_num[i] / kept_den[i] if kept_den[i] > 0 else 0.0 for i in range(len(opened))]
    result.stats = job.stats
    result.seconds = time.perf_counter() - t0
    return result


def inspect_adapter(source) -> dict:
    """What an adapter holds (from its header and config): format, modules with kind, shape,
    rank, alpha, scale and dtype, and the parameter count."""
    ad = source if isinstance(source, Adapter) else open_adapter(source)
    mods = []
    total = 0
    for name, s in ad.modules.items():
        n = (s.rank * s.in_features + s.out_features * s.rank)
        total += n
        mods.append({"name": name, "kind": s.kind, "out": s.out_features, "in": s.in_features,
                     "rank": s.rank, "alpha": s.alpha, "scale": s.scale, "dtype": str(s.dtype).removeprefix("torch."),
                     "params": n})
    return {"label": ad.label, "format": ad.format, "modules": mods, "parameters": total,
            "passthrough": list(ad.passthrough),
            "base_model_name_or_path": ad.config.get("base_model_name_or_path"),
            "use_rslora": bool(ad.config.get("use_rslora", False))}
