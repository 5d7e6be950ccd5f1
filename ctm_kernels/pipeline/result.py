"""What a merge returns: the merged modules, how they were made, what they kept, where the time went."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import AdapterError, LazyTensor, MergedModule, merged_config
from ..io.destination import check_output
from ..io.formats import OutputFormat, output_format
from ..options import DEFAULT_KOHYA_PREFIX
from .config import resolved_config
from .plan import MergePlan
from .write import OutputSpec


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class MergeResult:
    """A merged adapter: ``modules`` (factors per module), how it was made, and what it kept.

    What the merge did at each module is ``modules[i].info``, a
    :class:`~ctm_kernels.io.ModuleInfo` (sweeps, the stop test that ended them, and per adapter
    the shares below). ``energy_kept[t]`` is the share of adapter t's update (its
    ``sum ||dW_t||_F^2`` over the modules it adapts) that lies in the merged subspaces: per
    module ``info.energy_kept``, aggregated weighted by ``||dW_t||_F^2``.
    ``share_after_rule[t]`` is what survives the rule: ``sum <dW_t, dW> / sum ||dW_t||_F^2``
    over those modules (1: the merged update carries adapter t at full strength).

    When the merge wrote its output (``output`` set), the modules' factors are meta tensors
    (shapes and dtypes only): the data is in the written file; their ``info`` is complete."""

    modules: list[MergedModule]
    rank: int | str
    method: str
    params: dict
    adapters: list[str]
    energy_kept: list[float]
    seconds: float
    plan: MergePlan | None = field(repr=False, default=None)
    share_after_rule: list[float] = field(default_factory=list)
    stats: MergeStats = field(default_factory=lambda: MergeStats())
    output: Path | None = None
    format: str | None = None

    def __repr__(self) -> str:
        where = f", written to {str(self.output)!r}" if self.output is not None else ""
        return (f"MergeResult({len(self.modules)} modules, rank={self.rank}, method={self.method!r}, "
                f"adapters={len(self.adapters)}{where})")

    @property
    def inputs(self):
        return self.plan.adapters

    def _check_in_memory(self) -> None:
        if any(mm.A.is_meta for mm in self.modules):
            raise ValueError(f"the merged factors were written to {self.output} and not kept in memory; "
                             "merge without output= to get them as tensors")

    # -- what PEFT would load -----------------------------------------------------------------

    def config(self) -> dict:
        """The ``adapter_config.json`` of the PEFT output."""
        return merged_config(self.modules, self.plan.out_rank, self.inputs)

    def passthrough(self) -> dict[str, LazyTensor]:
        """Full tensors PEFT stores with an embedding or lm_head LoRA (its base weights); every
        input that carries one must carry the same values, which the output then carries unchanged."""
        holders: dict[str, list] = {}
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

    def _tensors(self, fmt: OutputFormat) -> dict:
        """Every tensor of the output in ``fmt``, the inputs' base tensors lazy."""
        return fmt.with_passthrough(fmt.tensors(self.modules), self.passthrough())

    def state_dict(self, format: str = "peft", *, kohya_prefix: str = DEFAULT_KOHYA_PREFIX) -> dict[str, torch.Tensor]:
        """The merged adapter's tensors as PEFT (``base_model.model.<module>.lora_A.weight``...)
        or kohya (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) keys."""
        self._check_in_memory()
        out = self._tensors(output_format(None, format, kohya_prefix))
        return {k: v.load() if isinstance(v, LazyTensor) else v for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {"ctm_method": self.method, "ctm_rank": str(self.rank),
                "ctm_params": ",".join(f"{k}={v}" for k, v in sorted(self.params.items())),
                "ctm_adapters": str(len(self.adapters))}

    def output_spec(self, dest: Path, fmt: OutputFormat, overwrite: bool) -> OutputSpec:
        """The :class:`~.write.OutputSpec` that writes this result to ``dest`` in ``fmt``."""
        resolved = resolved_config(self.plan, fmt)
        meta = fmt.metadata(self.metadata(), self.plan.out_rank, resolved)
        return OutputSpec(dest, fmt, overwrite, self._tensors(fmt), meta, self.config, resolved)

    def save(self, path: str | os.PathLike, format: str | None = None, *, overwrite: bool = False,
             kohya_prefix: str = DEFAULT_KOHYA_PREFIX) -> Path:
        """Write a PEFT adapter folder or a kohya ``.safetensors`` file (``format`` None: kohya
        when ``path`` ends in ``.safetensors``), atomically: nothing appears at ``path`` unless
        the whole output was written. The bytes are those ``merge(..., output=path)`` writes, and
        the same checks apply (never over or inside an input; ``overwrite`` replaces only a
        previous ctm output)."""
        self._check_in_memory()
        dest = Path(path)
        fmt = output_format(dest, format, kohya_prefix)
        spec = self.output_spec(dest, fmt, overwrite)
        state = {k: v.load() if isinstance(v, LazyTensor) else v for k, v in spec.layout.items()}
        check_output(dest, fmt, [s for s in self.plan.sources if s is not None], overwrite)
        return spec.save(state)

    # -- report ---------------------------------------------------------------------------------

    def summary(self) -> str:
        """A few lines: inputs, modules, rank, time, convergence, per-adapter share kept."""
        its = [mm.info.iterations for mm in self.modules]
        unconverged = sum(1 for mm in self.modules if not mm.info.converged)
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        lines = [
            f"merged {_plural(len(self.adapters), 'adapter')} into {_plural(len(self.modules), 'module')} at rank "
            f"{self.rank} with {self.method}{f' ({params})' if params else ''} in {self.seconds:.2f} s",
            f"subspace iterations per module: mean {sum(its) / max(1, len(its)):.1f}, max {max(its, default=0)}, "
            f"stop test {self.plan.settings.stop if self.plan is not None else '?'}"
            + (f"; {_plural(unconverged, 'module')} stopped at max_iter before it passed" if unconverged else ""),
            "each adapter's update: share of its energy in the merged subspace (at most 100 %) / how much of it "
            "the merged update carries, <dW_t, dW> / ||dW_t||^2 (100 %: at full strength):",
        ]
        width = max(len(a) for a in self.adapters)
        shares = self.share_after_rule or [float("nan")] * len(self.adapters)
        for label, kept, share in zip(self.adapters, self.energy_kept, shares):
            lines.append(f"  {label:<{width}}  {100 * kept:6.2f} %  {100 * share:7.2f} %")
        if any(sh > 1.0 for sh in shares):
            lines.append("  (above 100 %: other adapters' updates point the same way and add to this one's, "
                         "as summing two copies of an adapter carries it at 200 %)")
        if any(sh < 0.0 for sh in shares):
            lines.append("  (below 0 %: the merged update points against this adapter's update)")
        st = self.stats
        procs = f" on {st.world_size} processes" if st.world_size > 1 else ""
        lines.append(f"{_plural(st.groups, 'module group')}{procs}; read {st.bytes_read / 2**20:,.1f} MiB of factors "
                     f"in {st.read_seconds:.2f} s ({st.wait_seconds:.2f} s of merging waited on reads), "
                     f"peak RSS {st.peak_rss_bytes / 2**30:.2f} GiB")
        return "\n".join(lines)

    def stopped_by(self) -> dict:
        """How many modules each stop test ended (``energy``, ``flat``, ``subspace``, ``max_iter``)."""
        counts: dict = {}
        for mm in self.modules:
            key = mm.info.stopped_by
            counts[key] = counts.get(key, 0) + 1
        return counts

    def report(self) -> dict:
        """The summary as plain data (what ``ctm merge --report`` writes)."""
        its = [mm.info.iterations for mm in self.modules]
        return {
            "adapters": list(self.adapters), "energy_kept": list(self.energy_kept),
            "share_after_rule": list(self.share_after_rule), "rank": self.rank,
            "method": self.method, "params": dict(self.params), "modules": len(self.modules),
            "iterations_mean": sum(its) / max(1, len(its)), "iterations_max": max(its, default=0),
            "unconverged": sum(1 for mm in self.modules if not mm.info.converged),
            "stopped_by": self.stopped_by(), "seconds": self.seconds, "output": None if self.output is None else str(self.output),
            "format": self.format, "stats": asdict(self.stats),
        }
