"""What is checked when, and the records that let a checksum be computed once.

Every file a manifest names has a ``FileRef``: path relative to the store, sha256, size.

- ``check_present``: every file exists, is a regular file inside the store and has the recorded
  size. One ``stat`` per file: ``load_store`` always does it.
- ``verify_file``: the sha256 of the whole file equals the manifest's. ``load_store`` does it for
  the files it reads whole (transform, quantizer, document tables: small); the large files it
  memory-maps (token streams, inverted lists) are checksummed by ``dresd verify`` or
  ``load_store(verify="full")``, never by a default load, because that would read every byte.
- ``Records``: a successful checksum is recorded under ``STORE/verified/`` (or, when the store is
  read-only, under ``$DRESD_CACHE/verified/``) with the file's size, mtime, ctime and inode; a
  file whose size, mtime, ctime and inode are unchanged since is not checksummed again. A file
  written in place since (a flipped byte written back, a file overwritten with zeros) is checked
  again: a write changes its ctime even when its mtime is set back (``touch -r``,
  ``rsync --inplace --times``), and ctime cannot be set.

Store files are never written in place (schemas/FORMAT.md, "Files are immutable"), so a file
that changes is corrupt by definition; ``Store.check`` re-checks a loaded store's sizes and list
headers without reading the files, ``dresd verify`` every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from schemas.atomic import write_text_atomic
from schemas.manifest import FileRef, StoreFormatError, file_digest
from schemas.paths import store_file

VERIFIED_DIR = "verified"


def _resolve(root: Path, ref: FileRef) -> Path:
    return store_file(root, ref.path)


def check_present(root: str | os.PathLike, refs: Iterable[FileRef]) -> None:
    """Each file exists as a regular file of the recorded size (no bytes are read)."""
    root = Path(root)
    for ref in refs:
        path = _resolve(root, ref)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreFormatError(f"{path} does not exist (named by the manifest)") from None
        if not path.is_file():
            raise StoreFormatError(f"{path} is not a regular file")
        if st.st_size != ref.bytes:
            raise StoreFormatError(f"{path} is corrupt: {st.st_size} bytes, the manifest says "
                                   f"{ref.bytes} (truncated or replaced)")


def verify_file(root: str | os.PathLike, ref: FileRef) -> None:
    """Checksum one file against its manifest entry; StoreFormatError if it differs."""
    path = _resolve(Path(root), ref)
    digest, size = file_digest(path)
    if digest != ref.sha256 or size != ref.bytes:
        raise StoreFormatError(
            f"{path} is corrupt: its checksum does not match the manifest "
            f"(sha256 {digest[:12]}, {size} bytes; manifest {ref.sha256[:12]}, {ref.bytes} bytes)"
        )


def _fallback_dir(root: Path) -> Path:
    cache = Path(os.environ.get("DRESD_CACHE", Path.home() / ".cache" / "dresd"))
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache / VERIFIED_DIR / key


class Records:
    """Checksums already verified, keyed by path and content digest, valid while the file's
    size, mtime, ctime and inode are unchanged."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dirs = [self.root / VERIFIED_DIR, _fallback_dir(self.root)]

    @staticmethod
    def _name(ref: FileRef) -> str:
        where = hashlib.sha256(ref.path.encode()).hexdigest()[:16]
        return f"{ref.sha256[:32]}-{where}.json"

    def _stamp(self, ref: FileRef) -> dict | None:
        try:
            st = (self.root / ref.path).stat()
        except OSError:
            return None
        return {"path": ref.path, "sha256": ref.sha256, "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}

    def is_verified(self, ref: FileRef) -> bool:
        stamp = self._stamp(ref)
        if stamp is None or stamp["bytes"] != ref.bytes:
            return False
        for d in self.dirs:
            try:
                if json.loads((d / self._name(ref)).read_text()) == stamp:
                    return True
            except (OSError, ValueError):
                continue
        return False

    def record(self, ref: FileRef) -> None:
        stamp = self._stamp(ref)
        if stamp is None:
            return
        text = json.dumps(stamp, sort_keys=True)
        for d in self.dirs:
            try:
                write_text_atomic(d / self._name(ref), text)
                return
            except OSError:
                continue  # a read-only store: record in the cache instead


@dataclass
class VerifyReport:
    checked: list[FileRef]  # checksummed now
    skipped: list[FileRef]  # recorded as verified and unchanged
    corrupt: list[tuple[FileRef, str]]  # (file, reason)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    @property
    def checked_bytes(self) -> int:
        return sum(r.bytes for r in self.checked)


def verify_files(root: str | os.PathLike, refs: Iterable[FileRef], threads: int = 4,
                 force: bool = False, on_bytes: Callable[[int], None] | None = None,
                 ) -> VerifyReport:
    """Checksum ``refs`` in ``threads`` threads (hashlib releases the GIL), skipping files
    recorded as verified and unchanged unless ``force``; records every file that passes."""
    root = Path(root)
    records = Records(root)
    unique = list(dict.fromkeys(refs))
    todo = [r for r in unique if force or not records.is_verified(r)]
    skipped = [r for r in unique if r not in todo]
    corrupt: list[tuple[FileRef, str]] = []

    def one(ref: FileRef):
        try:
            verify_file(root, ref)
        except (StoreFormatError, OSError) as e:
            return ref, str(e)
        records.record(ref)
        return ref, None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for ref, err in pool.map(one, todo):
            if err:
                corrupt.append((ref, err))
            if on_bytes:
                on_bytes(ref.bytes)
    return VerifyReport(checked=todo, skipped=skipped, corrupt=corrupt)
