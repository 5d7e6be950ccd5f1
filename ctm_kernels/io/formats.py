"""The formats a merged adapter is written in: a PEFT adapter folder or a kohya file.

Each format is one object that owns everything that differs between them: whether the output
is a folder or a file (and so which paths it takes), the names of the merged tensors, the
file's metadata, the problems a plan must report before writing it, how it is written
atomically, and what a previous ctm output of it looks like (the only thing ``overwrite`` may
replace). Nothing else in the package asks which format it has.
"""
from __future__ import annotations

import abc
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

from ..options import DEFAULT_KOHYA_PREFIX, MERGE
from .kohya import kohya_name, kohya_tensors
from .peft import CONFIG_NAME, WEIGHTS_NAME, peft_tensors, write_config
from .adapter import AdapterError, MergedModule
from .destination import atomic_dir, atomic_file
from .safetensors_io import LazyTensor, header_metadata

# the resolved merge config inside a PEFT output folder (a kohya file carries it as metadata)
RESOLVED_CONFIG_NAME = "ctm_merge.yaml"
_SUFFIX = ".safetensors"


def written_by_ctm(path: Path) -> bool:
    """A safetensors file whose metadata says ctm wrote it."""
    meta = header_metadata(path)
    return bool(meta) and "ctm_method" in meta


class OutputFormat(abc.ABC):
    """One way to write a merged adapter."""

    name: str

    def __repr__(self) -> str:
        return f"<{self.name} output>"

    @abc.abstractmethod
    def check_path(self, output: Path) -> None:
        """Raise ``ValueError`` unless ``output`` names something of this format."""

    @abc.abstractmethod
    def tensors(self, modules: list[MergedModule]) -> dict[str, torch.Tensor]:
        """The merged modules' tensors under this format's names."""

    @abc.abstractmethod
    def with_passthrough(self, tensors: dict, passthrough: dict[str, LazyTensor]) -> dict:
        """``tensors`` and the inputs' full base tensors, as far as this format carries them."""

    @abc.abstractmethod
    def metadata(self, ctm: dict[str, str], out_rank: int, resolved: str) -> dict[str, str]:
        """The safetensors metadata: ``ctm`` (how the merge ran) and this format's own keys."""

    def settings(self) -> dict:
        """What a resolved config records of this format beyond its name."""
        return {}

    def check_plan(self, entries: list, adapters: list, writes: bool, problem: Callable) -> None:
        """Report (``problem(message, exception class)``) what this format cannot hold of a
        plan's modules (``entries``) and inputs; ``writes``: the plan has an output path."""

    @abc.abstractmethod
    def temporary(self, stack: ExitStack, dest: Path, overwrite: bool) -> Path:
        """The temporary weights file of the output ``dest``, renamed into place when ``stack``
        closes without an error (removed otherwise)."""

    def finish(self, weights: Path, config: Callable[[], dict], resolved: str) -> None:
        """Write what goes next to the weights file (``config``: the PEFT adapter config)."""

    @abc.abstractmethod
    def check_previous(self, dest: Path) -> None:
        """Raise ``ValueError`` unless the existing ``dest`` is a previous ctm output of this format."""


class PeftFolder(OutputFormat):
    """A PEFT adapter folder: ``adapter_config.json``, ``adapter_model.safetensors`` and the
    resolved merge config ``ctm_merge.yaml``."""

    name = "peft"
    FILES = (CONFIG_NAME, WEIGHTS_NAME, RESOLVED_CONFIG_NAME)

    def check_path(self, output: Path) -> None:
        if output.suffix.lower() == _SUFFIX:
            raise ValueError(f"{output}: a PEFT adapter is a folder; give a folder name, or write a kohya "
                             "file (format kohya)")

    def tensors(self, modules):
        return peft_tensors(modules)

    def with_passthrough(self, tensors, passthrough):
        return {**tensors, **passthrough}

    def metadata(self, ctm, out_rank, resolved):
        return {"format": "pt", **ctm}

    def check_plan(self, entries, adapters, writes, problem):
        if not writes:
            return
        # kohya inputs whose module names were not matched to PEFT module paths
        kohya_named = [a for a in adapters if a.format == "kohya" and any("." not in n for n in a.modules)]
        if kohya_named:
            problem(f"{kohya_named[0].label}: kohya module names such as {next(iter(kohya_named[0].modules))} "
                    "are flattened paths that a PEFT adapter cannot target; write a kohya file "
                    "(an output ending in .safetensors)", AdapterError)

    def temporary(self, stack, dest, overwrite):
        return stack.enter_context(atomic_dir(dest, overwrite=overwrite)) / WEIGHTS_NAME

    def finish(self, weights, config, resolved):
        write_config(weights.parent, config())
        (weights.parent / RESOLVED_CONFIG_NAME).write_text(resolved)

    def check_previous(self, dest):
        if not dest.is_dir():
            raise ValueError(f"{dest}: is a file, not a previous ctm output folder; overwrite replaces only that")
        for child in sorted(dest.iterdir()):
            if child.name not in self.FILES or not child.is_file():
                raise ValueError(f"{dest}: holds {child.name}, which ctm did not write; overwrite replaces "
                                 "only a previous ctm output")
        if not written_by_ctm(dest / WEIGHTS_NAME):
            raise ValueError(f"{dest / WEIGHTS_NAME}: not written by ctm; overwrite replaces only a previous "
                             "ctm output")


class KohyaFile(OutputFormat):
    """A kohya LoRA ``.safetensors`` file, module paths named ``<prefix>_<path with _>``; the
    resolved merge config is its ``ctm_config`` metadata."""

    name = "kohya"

    def __init__(self, prefix: str = DEFAULT_KOHYA_PREFIX):
        self.prefix = prefix

    def check_path(self, output: Path) -> None:
        if output.suffix.lower() != _SUFFIX:
            raise ValueError(f"{output}: a kohya LoRA is one file; give a path ending in .safetensors")

    def tensors(self, modules):
        return kohya_tensors(modules, self.prefix)

    def with_passthrough(self, tensors, passthrough):
        if passthrough:
            raise ValueError(f"{next(iter(passthrough))}: " + _NO_BASE_WEIGHTS)
        return tensors

    def metadata(self, ctm, out_rank, resolved):
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(out_rank),
                "ss_network_alpha": str(out_rank), **ctm, "ctm_config": resolved}

    def settings(self):
        return {"kohya_prefix": self.prefix}

    def check_plan(self, entries, adapters, writes, problem):
        owner: dict[str, str] = {}
        for e in entries:
            if e.first.kind == "embedding":
                problem(f"{e.name}: embedding LoRA has no kohya representation; use the PEFT format", ValueError)
                continue
            k = kohya_name(e.name, self.prefix)
            if k in owner:
                problem(f"modules {owner[k]} and {e.name} both map to the kohya name {k}", ValueError)
            owner[k] = e.name
        for ad in adapters:
            for key in ad.passthrough:
                problem(f"{ad.label}: {key}: " + _NO_BASE_WEIGHTS, ValueError)

    def temporary(self, stack, dest, overwrite):
        return stack.enter_context(atomic_file(dest, overwrite=overwrite))

    def check_previous(self, dest):
        if not dest.is_file() or not written_by_ctm(dest):
            raise ValueError(f"{dest}: not a kohya file written by ctm; overwrite replaces only a previous ctm output")


_NO_BASE_WEIGHTS = ("full base weights (saved by PEFT with an embedding or lm_head LoRA) have no kohya "
                    "representation; use the PEFT format")
# by name (options.FORMAT_NAMES), made with the kohya prefix
FORMATS: dict[str, Callable[[str], OutputFormat]] = {"peft": lambda prefix: PeftFolder(), "kohya": KohyaFile}


def output_format(output, name: str | None = None, kohya_prefix: str = DEFAULT_KOHYA_PREFIX) -> OutputFormat:
    """The format ``name`` ("peft", "kohya"), checked against ``output``; None (or "auto") picks
    it from ``output``: a kohya file for a path ending in ``.safetensors``, else a PEFT folder."""
    name = MERGE.by_name["format"].validate(name)
    if name is None:
        name = "kohya" if output is not None and Path(output).suffix.lower() == _SUFFIX else "peft"
    fmt = FORMATS[name](kohya_prefix)
    if output is not None:
        fmt.check_path(Path(output))
    return fmt
