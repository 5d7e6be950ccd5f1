"""Stage 4, write: the merged modules into one atomic output, as their groups finish.

The output's header is computed from the plan (names, shapes, dtypes) before the first
group is merged, so each merged tensor is written at its offset as soon as it exists and then
dropped. Everything goes to a temporary folder (file) next to the output that is renamed into
place when complete. Under ``torch.distributed`` rank 0 writes the output and the other ranks
write part files next to it that rank 0 copies in, tensor by tensor, once every rank is done:
the bytes one process writes.

Users' files are never written over: the output may not be an input, lie inside one or hold
one, and ``overwrite`` replaces only what ctm wrote before (checked from its content).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, write_config
from ..io.stream import LazyTensor, MergedModule, SafetensorsStore, SafetensorsWriter, atomic_dir, atomic_file
from .ranks import Ranks, failure, relay

RESOLVED_CONFIG_NAME = "ctm_merge.yaml"
# what a ctm PEFT output folder holds; --overwrite refuses a folder with anything else
OUTPUT_FILES = (CONFIG_NAME, WEIGHTS_NAME, RESOLVED_CONFIG_NAME)


def _header_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file, or None when it is not one."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _written_by_ctm(path: Path) -> bool:
    meta = _header_metadata(path)
    return bool(meta) and "ctm_method" in meta


def check_output(dest: Path, fmt: str, sources: list[Path], overwrite: bool) -> None:
    """Raise ``ValueError`` unless the merge may write ``dest``: not an input, not inside an
    input, not holding one; a missing ``dest`` needs an existing parent folder, an existing one
    needs ``overwrite`` and must be a previous ctm output of the same kind."""
    here = dest.resolve()
    for src in sources:
        there = src.resolve()
        if here == there:
            raise ValueError(f"{dest}: is the input {src}; the merge never writes over an input")
        if there in here.parents:
            raise ValueError(f"{dest}: lies inside the input {src}; write the merge elsewhere")
        if here in there.parents:
            raise ValueError(f"{dest}: holds the input {src}; write the merge elsewhere")
    if not (dest.exists() or dest.is_symlink()):
        if not dest.parent.is_dir():
            raise ValueError(f"{dest.parent}: no such directory for the output")
        _check_writable(dest.parent)
        return
    _check_writable(dest.parent)
    if not overwrite:
        raise ValueError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace a previous "
                         "ctm output)")
    if dest.is_symlink():
        raise ValueError(f"{dest}: is a symbolic link; overwrite replaces only a previous ctm output")
    if fmt == "peft":
        if not dest.is_dir():
            raise ValueError(f"{dest}: is a file, not a previous ctm output folder; overwrite replaces only that")
        for child in sorted(dest.iterdir()):
            if child.name not in OUTPUT_FILES or not child.is_file():
                raise ValueError(f"{dest}: holds {child.name}, which ctm did not write; overwrite replaces "
                                 "only a previous ctm output")
        if not _written_by_ctm(dest / WEIGHTS_NAME):
            raise ValueError(f"{dest / WEIGHTS_NAME}: not written by ctm; overwrite replaces only a previous "
                             "ctm output")
    elif not dest.is_file() or not _written_by_ctm(dest):
        raise ValueError(f"{dest}: not a kohya file written by ctm; overwrite replaces only a previous ctm output")


def _check_writable(folder: Path) -> None:
    """The output is written to a temporary entry in ``folder`` and renamed: both need write
    and search permission there (what the dry run can see; a read-only filesystem too)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: no permission to write the output there (the merge writes a temporary "
                         "output next to OUT and renames it)")


def _destination(stack: ExitStack, dest: Path, fmt: str, overwrite: bool) -> Path:
    """The temporary weights file of the output ``dest``, renamed into place when ``stack`` closes
    without an error (removed otherwise)."""
    try:
        if fmt == "peft":
            return stack.enter_context(atomic_dir(dest, overwrite=overwrite)) / WEIGHTS_NAME
        return stack.enter_context(atomic_file(dest, overwrite=overwrite))
    except PermissionError as e:
        raise ValueError(f"{dest.parent}: no permission to write the output there ({e.strerror})") from None


class Output:
    """What is written: ``layout`` (every tensor name -> a meta tensor or a :class:`LazyTensor`,
    in file order), ``tensors_of`` (merged modules -> their named tensors), the file's
    metadata, and for a PEFT folder its config and resolved merge config."""

    def __init__(self, dest: Path, fmt: str, overwrite: bool, layout: dict, tensors_of: Callable,
                 metadata: dict, config: dict | None, resolved: str):
        self.dest, self.fmt, self.overwrite = dest, fmt, overwrite
        self.layout, self.tensors_of, self.metadata = layout, tensors_of, metadata
        self.config, self.resolved = config, resolved

    def save(self, tensors: dict) -> Path:
        """Write in-memory ``tensors`` (``tensors_of`` applied already) as this output."""
        with ExitStack() as stack:
            final = _destination(stack, self.dest, self.fmt, self.overwrite)
            with SafetensorsWriter(final, self.layout, self.metadata) as w:
                for name, t in tensors.items():
                    w.write(name, t.load() if isinstance(t, LazyTensor) else t)
            self._finish_folder(final.parent)
        return self.dest

    def _finish_folder(self, folder: Path) -> None:
        if self.fmt == "peft":
            write_config(folder, self.config)
            (folder / RESOLVED_CONFIG_NAME).write_text(self.resolved)

    def stream(self, ranks: Ranks, run: Callable[[Callable[[MergedModule], None]], None],
               mine: list[str]) -> tuple[dict[str, dict], list]:
        """Call ``run(emit)``, which merges this rank's modules (named ``mine``) and hands each to
        ``emit`` as its group finishes, writing them into the output; returns every module's
        info (all ranks') and every rank's ``run`` statistics (as ``run`` returns them).

        Every failure is raised on every rank, and leaves nothing at ``dest``."""
        infos: dict[str, dict] = {}
        reached_end = False
        err = None
        gathered = []
        try:
            with ExitStack() as stack:
                # rank 0 sets up the temporary output (and the part folder) and tells the others
                own, setup, parts, writer = None, None, None, None
                if ranks.rank == 0:
                    try:
                        final = _destination(stack, self.dest, self.fmt, self.overwrite)
                        writer = stack.enter_context(SafetensorsWriter(final, self.layout, self.metadata))
                        if ranks.world > 1:
                            parts = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.parts-", dir=self.dest.parent))
                            stack.callback(shutil.rmtree, parts, True)
                    except Exception as e:
                        if ranks.world == 1:
                            raise
                        own, setup = e, failure(e)
                parts_name, setup = ranks.broadcast((None if parts is None else str(parts), setup))
                relay([setup], own)

                def emit(mm):
                    infos[mm.name] = mm.info
                    for key, t in self.tensors_of([mm]).items():
                        writer.write(key, t)

                own, stats = None, None
                try:
                    if ranks.rank != 0:
                        keys = [k for k in self.layout if k in set(mine)]
                        path = Path(parts_name) / f"part-{ranks.rank:05d}.safetensors"
                        writer = stack.enter_context(SafetensorsWriter(path, {k: self.layout[k] for k in keys}))
                    stats = run(emit)
                    if ranks.rank != 0:
                        writer.close()
                except Exception as e:
                    if ranks.world == 1:
                        raise
                    own = e
                gathered = ranks.gather((failure(own), infos, stats))
                relay([f for f, *_ in gathered], own)
                for r, (_, their_infos, _) in enumerate(gathered):
                    if r != ranks.rank:
                        infos.update(their_infos)
                reached_end = True
                if ranks.rank == 0:
                    t0 = time.perf_counter()
                    for r in range(1, ranks.world):
                        part = SafetensorsStore(Path(parts_name) / f"part-{r:05d}.safetensors")
                        for key in part.keys():
                            writer.write(key, part.get([key])[key])
                    for key, t in self.layout.items():
                        if isinstance(t, LazyTensor):
                            writer.write(key, t.load())
                    writer.close()
                    self._finish_folder(final.parent)
                    gathered[0][2].write_seconds += time.perf_counter() - t0
        except Exception as e:
            if not reached_end or ranks.world == 1:
                raise
            err = e
        if ranks.world > 1:
            # every rank returns once the output is in place (or raises when it is not)
            status = ranks.broadcast(None if err is None or ranks.rank != 0 else failure(err))
            if err is not None:
                raise err
            relay([status], None)
        return infos, [st for *_, st in gathered]
