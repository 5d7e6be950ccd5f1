"""Hugging Face Hub ids as adapter sources, resolved through ``huggingface_hub``'s cache.

``org/name`` (optionally ``org/name@revision``) names a Hub repository holding a PEFT adapter
folder or a kohya ``.safetensors``, unless it looks like a local path: one that exists, starts
with ``.``, ``/`` or ``~``, or whose parent folder (``org/``) exists here; such a source that is
missing is "no such file or folder", with no network access. ``hf://org/name[@revision]`` is a
Hub id whatever exists locally. The snapshot is taken from the local cache when it is there
(always so with ``HF_HUB_OFFLINE=1``), and downloaded into that cache otherwise; only configs
and ``.safetensors`` files are fetched (never pickles). A resolved config records a Hub input
as ``org/name@commit`` (the snapshot read), so it runs on another machine.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .adapter import AdapterError

# the Hub's repository id syntax: one '/', names of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_PATTERNS = ["*.json", "*.safetensors"]


_SCHEME = "hf://"


def looks_local(source: str) -> bool:
    """True when ``source`` reads as a local path: it exists, starts with ``.``, ``/`` or ``~``,
    or its parent folder exists (``adapters/typo`` next to a folder ``adapters``)."""
    if source.startswith((".", "/", "~", os.sep)) or os.path.exists(source):
        return True
    parent = os.path.dirname(source.split("@", 1)[0])
    return bool(parent) and os.path.isdir(parent)


def hub_id(source: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` is a Hub id: ``hf://org/name[@revision]``, or
    ``org/name[@revision]`` that does not look like a local path (:func:`looks_local`)."""
    explicit = source.startswith(_SCHEME)
    m = _HUB_ID.match(source[len(_SCHEME):] if explicit else source)
    if m is None or (not explicit and looks_local(source)):
        return None
    return m["repo"], m["revision"]


def missing(source: str) -> str:
    """The error for a source that is neither a local path nor a Hub id."""
    hint = ""
    if _HUB_ID.match(source) and looks_local(source) and not source.startswith((".", "/", "~")):
        hint = (f" (read as a local path because the folder {os.path.dirname(source.split('@', 1)[0])}/ exists "
                f"here; write {_SCHEME}{source} for the Hugging Face Hub repository)")
    return f"{source}: no such file or folder{hint}"


def resolve(source: str) -> Path:
    """The local snapshot folder of the Hub adapter ``source`` (``org/name[@revision]``)."""
    repo, revision = hub_id(source)
    source = source.removeprefix(_SCHEME)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - installed with transformers
        raise AdapterError(f"{source}: no such file or folder (Hub ids need huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise AdapterError(f"{source}: no such file or folder, and not in the Hugging Face cache "
                           "(HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line naming the source
        raise AdapterError(f"{source}: no such file or folder, and not read from the Hugging Face Hub: "
                           f"{_why(e)}") from None


def _why(e: Exception) -> str:
    """One complete clause for a failed Hub download (the library's own messages run to
    several lines and URLs)."""
    name = type(e).__name__
    if name == "RepositoryNotFoundError":
        return "no such repository (or it is private: log in with `hf auth login`)"
    if name == "RevisionNotFoundError":
        return "no such revision in the repository"
    if name in ("GatedRepoError",):
        return "the repository is gated: accept its terms on the Hub and log in"
    if "Connect" in name or "Timeout" in name or "Offline" in name or isinstance(e, OSError):
        return f"the Hub could not be reached ({name}); set HF_HUB_OFFLINE=1 to use the local cache only"
    return f"{name}"
