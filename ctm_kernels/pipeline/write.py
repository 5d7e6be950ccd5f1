"""Stage 4, write: the merged modules into one atomic output, as their groups finish.

The output's header is computed from the plan (names, shapes, dtypes) before the first
group is merged, so each merged tensor is written at its offset as soon as it exists and then
dropped. Everything goes to a temporary folder (file) next to the output that is renamed into
place when complete. Under ``torch.distributed`` rank 0 writes the output and the other ranks
write part files next to it that rank 0 copies in, tensor by tensor, once every rank is done:
the bytes one process writes.

Users' files are never written over (:mod:`.destination`).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from ..io.formats import OutputFormat
from ..io.stream import LazyTensor, MergedModule, SafetensorsStore, SafetensorsWriter
from .ranks import Ranks, failure, relay


def _temporary(stack: ExitStack, dest: Path, fmt: OutputFormat, overwrite: bool) -> Path:
    """The temporary weights file of the output ``dest`` (see :meth:`OutputFormat.temporary`)."""
    try:
        return fmt.temporary(stack, dest, overwrite)
    except PermissionError as e:
        raise ValueError(f"{dest.parent}: no permission to write the output there ({e.strerror})") from None


class Output:
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
            with SafetensorsWriter(final, self.layout, self.metadata) as w:
                for name, t in tensors.items():
                    w.write(name, t.load() if isinstance(t, LazyTensor) else t)
            self.fmt.finish(final, self.config, self.resolved)
        return self.dest

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
                        final = _temporary(stack, self.dest, self.fmt, self.overwrite)
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
                    for key, t in self.fmt.tensors([mm]).items():
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
                    self.fmt.finish(final, self.config, self.resolved)
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
