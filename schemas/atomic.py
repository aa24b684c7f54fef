"""Replace a file whole or not at all: write beside it, then rename over it.

``os.replace`` within one directory is atomic on POSIX, so a reader sees the old file or the new
one, never a prefix of the new one, and a crash mid-write leaves at most a temp file (named with
a leading dot and a random part, so concurrent writers never share one and ``*.json``-style
globs never match it). Used for every local file the project rewrites in place: caches, indexes
and configs. (Store generations are never replaced: schemas.commit creates them exclusively.)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temp path beside ``path`` to write to; it replaces ``path`` when the block ends
    without error, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
