"""Stage 4, write: where the merged modules go, as their groups finish.

A sink is opened once, handed each merged module (:meth:`emit`) by :func:`.run.execute` as its
group finishes, gives what this rank made to the other ranks (:meth:`part`) and is finished
with every rank's part. :class:`MemorySink` keeps the modules (a merge without an output);
:class:`FileSink` writes them into one atomic output.

The output's header is computed from the plan (names, shapes, dtypes) before the first group
is merged, so each merged tensor is written at its offset as soon as it exists and then
dropped. Everything goes to a temporary folder (file) next to the output that is renamed into
place when complete. Under ``torch.distributed`` rank 0 writes the output and the other ranks
write part files next to it that rank 0 copies in, tensor by tensor, once every rank is done:
the bytes one process writes.

Users' files are never written over (:mod:`ctm_kernels.io.destination`).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from ..io.adapter import MergedModule, ModuleInfo
from ..io.formats import OutputFormat
from ..io.safetensors_io import LazyTensor, SafetensorsStore, SafetensorsWriter, write_safetensors
from .ranks import Ranks


def _temporary(stack: ExitStack, dest: Path, fmt: OutputFormat, overwrite: bool) -> Path:
    """The temporary weights file of the output ``dest`` (see :meth:`OutputFormat.temporary`)."""
    try:
        return fmt.temporary(stack, dest, overwrite)
    except PermissionError as e:
        raise ValueError(f"{dest.parent}: no permission to write the output there ({e.strerror})") from None


class OutputSpec:
    """What is written: ``layout`` (every tensor name -> a meta tensor or a :class:`LazyTensor`,
    in file order) in format ``fmt`` with the file's ``metadata``; ``config`` makes the PEFT
    adapter config and ``resolved`` is the resolved merge config, for the format to place."""

    def __init__(self, dest: Path, fmt: OutputFormat, overwrite: bool, layout: dict, metadata: dict,
                 config: Callable[[], dict], resolved: str):
        self.dest, self.fmt, self.overwrite = dest, fmt, overwrite
        self.layout, self.metadata = layout, metadata
        self.config, self.resolved = config, resolved

    def save(self, tensors: dict) -> Path:
        """Write in-memory ``tensors`` (named in this format already) as this output."""
        with ExitStack() as stack:
            final = _temporary(stack, self.dest, self.fmt, self.overwrite)
            write_safetensors(final, tensors, self.metadata)
            self.fmt.finish(final, self.config, self.resolved)
        return self.dest


class MemorySink:
    """The merged modules, kept in memory (every rank's, on every rank)."""

    def __init__(self):
        self.modules: list[MergedModule] = []
        self.finish_seconds = 0.0

    def open(self, stack: ExitStack) -> None:
        """Nothing to set up: memory needs no temporary to clean up."""

    def emit(self, mm: MergedModule) -> None:
        self.modules.append(mm)

    def part(self) -> list[MergedModule]:
        return self.modules

    def finish(self, stack: ExitStack, parts: list[list[MergedModule]]) -> dict[str, MergedModule]:
        """Every rank's modules by name."""
        return {mm.name: mm for modules in parts for mm in modules}


class FileSink:
    """The merged modules written into ``output`` as they come; the result keeps their
    ``skeletons`` (meta tensors) with their :class:`ModuleInfo`. ``mine``: the names of the modules
    this rank merges."""

    def __init__(self, output: OutputSpec, ranks: Ranks, skeletons: list[MergedModule], mine: list[str]):
        self.output, self.ranks, self.mine = output, ranks, mine
        self.skeletons = {mm.name: mm for mm in skeletons}
        self.infos: dict[str, ModuleInfo] = {}
        self.writer: SafetensorsWriter | None = None
        self.final: Path | None = None          # rank 0: the temporary weights file
        self.parts: str | None = None           # under torchrun: the folder of the other ranks' parts
        self.finish_seconds = 0.0

    def open(self, stack: ExitStack) -> None:
        """Rank 0 sets up the temporary output (and a folder for the other ranks' parts), whose
        renaming or removal ``stack`` owns."""
        out, ranks = self.output, self.ranks
        self.stack = stack

        def setup():
            self.final = _temporary(stack, out.dest, out.fmt, out.overwrite)
            self.writer = stack.enter_context(SafetensorsWriter(self.final, out.layout, out.metadata))
            if ranks.world > 1:
                parts = Path(tempfile.mkdtemp(prefix=f".{out.dest.name}.parts-", dir=out.dest.parent))
                stack.callback(shutil.rmtree, parts, True)
                return str(parts)

        self.parts = ranks.first(setup)

    def _writer(self) -> SafetensorsWriter:
        """Rank 0's output file, or this rank's part file (opened on first use)."""
        if self.writer is None:
            path = Path(self.parts) / f"part-{self.ranks.rank:05d}.safetensors"
            mine = self.output.fmt.tensors([self.skeletons[name] for name in self.mine])
            layout = {k: t for k, t in self.output.layout.items() if k in mine}
            self.writer = self.stack.enter_context(SafetensorsWriter(path, layout))
        return self.writer

    def emit(self, mm: MergedModule) -> None:
        self.infos[mm.name] = mm.info
        for key, t in self.output.fmt.tensors([mm]).items():
            self._writer().write(key, t)

    def part(self) -> dict[str, ModuleInfo]:
        """What the merge did at this rank's modules, its part file complete."""
        if self.ranks.rank != 0:
            self._writer().close()
        return self.infos

    def finish(self, stack: ExitStack, parts: list[dict[str, ModuleInfo]]) -> dict[str, MergedModule]:
        """Rank 0 copies the other ranks' parts and the inputs' base tensors in and puts the
        output in place (closing ``stack``); every rank returns once it is there."""
        out = self.output

        def complete():
            t0 = time.perf_counter()
            for r in range(1, self.ranks.world):
                part = SafetensorsStore(Path(self.parts) / f"part-{r:05d}.safetensors")
                for key in part.keys():
                    self.writer.write(key, part.get([key])[key])
            for key, t in out.layout.items():
                if isinstance(t, LazyTensor):
                    self.writer.write(key, t.load())
            self.writer.close()
            out.fmt.finish(self.final, out.config, out.resolved)
            self.finish_seconds = time.perf_counter() - t0
            stack.close()

        self.ranks.first(complete)
        for infos in parts:
            for name, info in infos.items():
                self.skeletons[name].info = info
        return self.skeletons
