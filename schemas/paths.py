"""The one way a reader turns a store-relative path into a file to open.

A store reads only its own files: a relative path from a manifest (or a name like ``CURRENT``)
is refused if it is absolute, climbs out with ``..``, or passes through a symbolic link at any
component below the store root, so a planted link cannot make the runtime read (or echo) a file
elsewhere. The root itself may be a link: that is the user's choice of where the store lives.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from schemas.errors import StoreFormatError


def store_file(root: str | os.PathLike, relpath: str) -> Path:
    """``root / relpath`` after the checks above; StoreFormatError naming the path if refused."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise StoreFormatError(f"path {relpath!r} leaves the store {root}")
    path = Path(root)
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise StoreFormatError(f"{path} is a symbolic link: a store reads only its own "
                                   "files, not what a link points to")
    return path
