"""Where a merge may write: never over, inside or around an input, and over an existing path
only with ``overwrite`` and only when ctm wrote it (what that looks like is the format's)."""
from __future__ import annotations

import os
from pathlib import Path

from ..io.formats import OutputFormat


def check_output(dest: Path, fmt: OutputFormat, sources: list[Path], overwrite: bool) -> None:
    """Raise ``ValueError`` unless the merge may write ``dest``: not an input, not inside an
    input, not holding one; a missing ``dest`` needs an existing parent folder, an existing one
    needs ``overwrite`` and must be a previous ctm output of the same format."""
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
    fmt.check_previous(dest)


def _check_writable(folder: Path) -> None:
    """The output is written to a temporary entry in ``folder`` and renamed: both need write
    and search permission there (what the dry run can see; a read-only filesystem too)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: no permission to write the output there (the merge writes a temporary "
                         "output next to OUT and renames it)")
