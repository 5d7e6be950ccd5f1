"""Hugging Face Hub ids as adapter sources, resolved through ``huggingface_hub``'s cache.

``org/name`` (optionally ``org/name@revision``) that is not a local path names a Hub
repository holding a PEFT adapter folder or a kohya ``.safetensors``. The snapshot is taken
from the local cache when it is there (always so with ``HF_HUB_OFFLINE=1``), and downloaded
into that cache otherwise; only configs and ``.safetensors`` files are fetched (never pickles).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .stream import AdapterError

# the Hub's repository id syntax: one '/', names of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_PATTERNS = ["*.json", "*.safetensors"]


def hub_id(source: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` is a Hub id and no local path of that name exists."""
    m = _HUB_ID.match(source)
    if m is None or os.path.exists(source) or source.startswith("."):
        return None
    return m["repo"], m["revision"]


def resolve(source: str) -> Path:
    """The local snapshot folder of the Hub adapter ``source`` (``org/name[@revision]``)."""
    repo, revision = hub_id(source)
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
        raise AdapterError(f"{source}: no such file or folder, and not found on the Hugging Face Hub "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
