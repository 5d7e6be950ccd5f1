"""Adapters in and out: PEFT folders, kohya files, in-memory state dicts.

:func:`open_adapter` turns a path or a state dict into an :class:`~.adapter.Adapter` (header
and config only, validated); the factors are read later, a module group at a time.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from . import hub
from .kohya import read_kohya, read_kohya_state_dict, kohya_tensors, kohya_name
from .peft import (CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, merged_config, peft_tensors, read_peft,
                   read_peft_state_dict)
from .adapter import Adapter, AdapterError, MergedModule, ModuleInfo, ModuleSpec
from .safetensors_io import LazyTensor, write_safetensors

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def open_adapter(source, label: str | None = None) -> Adapter:
    """Open one adapter.

    ``source`` is a Hugging Face Hub id (``org/name[@revision]``, see :mod:`.hub`), a path (a PEFT adapter folder; its ``adapter_model.safetensors``; or a kohya
    ``.safetensors`` file), a kohya state dict, or a PEFT ``(state_dict, config)`` pair (config
    a dict or ``peft.LoraConfig``). Bad input raises :class:`AdapterError` (a ``ValueError``)
    naming the file and key."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if isinstance(source, str) and not path.exists():
            ident = hub.hub_id(source)
            if ident is not None:
                return _open_snapshot(hub.resolve(source), source, ident[0])
            raise AdapterError(hub.missing(source))
        if path.is_dir():
            return read_peft(path)
        if not path.exists():
            raise AdapterError(f"{source}: no such file or folder")
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise AdapterError(f"{source}: pickled weights are not read (they can run code when loaded); "
                               "convert the adapter to safetensors")
        if path.suffix.lower() != ".safetensors":
            raise AdapterError(f"{source}: expected a PEFT adapter folder or a .safetensors file")
        if path.name == WEIGHTS_NAME or (path.parent / CONFIG_NAME).is_file():
            return read_peft(path.parent)
        return read_kohya(path)
    label = label or "state dict"
    if isinstance(source, tuple) and len(source) == 2:
        return read_peft_state_dict(source[0], source[1], label)
    if isinstance(source, Mapping):
        if any(isinstance(k, str) and (".lora_A." in k or ".lora_embedding_A" in k) for k in source):
            raise AdapterError(f"{label}: PEFT-style keys need their config: pass (state_dict, config)")
        return read_kohya_state_dict(source, label)
    raise AdapterError(f"{label}: expected a path, a kohya state dict or a (state_dict, config) pair, "
                       f"got {type(source).__name__}")


def _open_snapshot(folder: Path, source: str, repo: str) -> Adapter:
    """A Hub snapshot: a PEFT adapter folder, or a repository holding one kohya file."""
    if (folder / CONFIG_NAME).is_file():
        ad = read_peft(folder)
    else:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            raise AdapterError(f"{source}: the Hub repository holds no {CONFIG_NAME} and "
                               f"{len(files)} .safetensors files; expected a PEFT adapter or one kohya file")
        ad = read_kohya(files[0])
    # reports and later errors name the adapter as the user did (its path in the cache says
    # little); the store keeps the path
    return replace(ad, label=source, origin=f"{repo}@{folder.name}")


__all__ = ["Adapter", "AdapterError", "LazyTensor", "MergedModule", "ModuleInfo", "ModuleSpec",
           "open_adapter", "read_peft", "read_peft_state_dict", "read_kohya", "read_kohya_state_dict",
           "peft_tensors", "kohya_tensors", "kohya_name", "merged_config",
           "write_safetensors", "PICKLE_NAMES"]
