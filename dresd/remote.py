"""A local copy of a remote store's generation, so the runtime can memory-map it.

``load_store("s3://bucket/store")`` resolves the newest committed generation through the commit
protocol (schemas.commit, on the filesystem layer of schemas.storage) and syncs the files its
manifest names into a cache directory, then opens that directory like any local store:

    $DRESD_CACHE/stores/<digest of the URL>/      (default ~/.cache/dresd/stores/...)
      SOURCE                     the URL, for people
      manifests/gen-NNNNNN.json  the synced generations' manifests
      shards/..., transform/..., index/...   the files they name, as in the store
      complete/gen-NNNNNN        written once every file of that generation is here, verified

Keyed by store URL and generation: shards never change once a manifest names them, so
generations share one mirror and a new generation downloads only its new shards. Every file is
downloaded under a temporary name, its sha256 and size checked against the manifest, and only
then renamed into place; a mismatch is a ``StoreFormatError`` and leaves nothing under the
final name. Each verified checksum is recorded (schemas.integrity), so the load that follows
does not read the large files again. A second load of a generation whose ``complete`` marker
exists, whose cached manifest is byte for byte the store's and every file present at its
recorded size, downloads nothing but that manifest. The key archive
(``archive.lance``), which the runtime never opens, is not downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from schemas import Manifest, StoreFormatError
from schemas.atomic import replacing, write_bytes_atomic
from schemas.commit import manifest_relpath, resolve_generation
from schemas.integrity import Records, check_present
from schemas.manifest import FileRef, parse_manifest
from schemas.paths import store_file
from schemas.storage import ObjectStoreIO, is_remote, location_key, reaching

log = logging.getLogger(__name__)

COMPLETE_DIR = "complete"
SOURCE_FILE = "SOURCE"

__all__ = ["cache_dir", "is_remote", "sync_store"]


def cache_root() -> Path:
    base = os.environ.get("DRESD_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dresd") / "stores"


def cache_dir(url: str) -> Path:
    """The local mirror of the store at ``url``."""
    return cache_root() / location_key(url)


def _runtime_files(manifest: Manifest) -> list[FileRef]:
    """Every file the runtime opens: all but the key archive."""
    return list(manifest.serving_files())


def _download(io: ObjectStoreIO, ref: FileRef, root: Path) -> None:
    final = store_file(root, ref.path)  # inside the cache, through no link
    # a mismatch raises inside the block, so the download is dropped and nothing replaces final
    with replacing(final) as tmp:
        h = hashlib.sha256()
        size = 0
        with reaching(io.url), io.fs.open(io.path(ref.path), "rb") as src, \
                open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                h.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        if h.hexdigest() != ref.sha256 or size != ref.bytes:
            raise StoreFormatError(
                f"{io.where(ref.path)} is corrupt: its checksum does not match the manifest "
                f"(sha256 {h.hexdigest()[:12]}, {size} bytes; manifest {ref.sha256[:12]}, "
                f"{ref.bytes} bytes); nothing was cached")


def sync_store(url: str, generation: int | None = None) -> tuple[Path, int, int]:
    """Mirror generation ``generation`` (default: the newest committed) of the store at ``url``
    into the cache; returns (local directory, generation, bytes downloaded)."""
    io = ObjectStoreIO(url)
    try:
        generation = generation or resolve_generation(io)
    except FileNotFoundError:
        raise FileNotFoundError(f"no store at {url}") from None
    root = cache_dir(url)
    marker = root / COMPLETE_DIR / f"gen-{generation:06d}"
    rel = manifest_relpath(generation)
    try:
        data = io.read(rel)  # one small read: the manifest decides what the cache must hold
    except FileNotFoundError:
        raise StoreFormatError(f"manifest generation {generation} is missing: "
                               f"{io.where(rel)}") from None
    manifest = parse_manifest(data, io.where(rel), generation)  # sealed, checked
    cached = root / rel
    # The cached copy counts only if it is this very manifest (a store deleted and built again
    # at the same URL starts again at generation 1) and every file it names is still there.
    if marker.is_file() and cached.is_file() and cached.read_bytes() == data:
        try:
            check_present(root, _runtime_files(manifest))
            return root, generation, 0
        except StoreFormatError:
            log.info("%s: cached copy of generation %d is incomplete; syncing again", url,
                     generation)
    marker.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / SOURCE_FILE).write_text(url.rstrip("/") + "\n")
    records = Records(root)
    downloaded = 0
    for ref in _runtime_files(manifest):
        path = root / ref.path
        if path.is_file() and path.stat().st_size == ref.bytes and records.is_verified(ref):
            continue  # fetched and verified by an earlier sync (shards never change)
        _download(io, ref, root)
        records.record(ref)
        downloaded += ref.bytes
    write_bytes_atomic(root / rel, data)
    write_bytes_atomic(marker, b"")
    log.info("%s: generation %d synced to %s (%.1f MiB downloaded)", url, generation, root,
             downloaded / 2**20)
    return root, generation, downloaded


