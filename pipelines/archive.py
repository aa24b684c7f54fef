"""Writing the key archive (schemas.archive): a fragment per shard, a version per generation.

Workers write a shard's fragment beside its files (``write_fragment``); nothing reads it as part
of the dataset until the launcher commits a version listing it (``commit_archive``), which it does
right before the generation's manifest. Each version lists every fragment of its generation's
shards, taken from the shards' entries (not from the dataset's latest version, which may be one a
crashed run committed and no manifest names), so an update adds fragments to its parent's, a
compaction replaces the merged shards' fragments with the merged shard's, and a re-index keeps
its parent's version.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from pipelines.faults import maybe_fail
from schemas.archive import (
    archive_schema,
    archive_uri,
    fragment_json,
    lance,
    lance_storage_options,
    version_relpath,
)
from schemas.layout import ARCHIVE_DIR
from schemas.manifest import ArchiveFragment, ArchiveSpec, ShardInfo, make_file_ref
from schemas.shard_io import KEY_DTYPE
from schemas.storage import StoreIO

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 16


def archive_table(shard_id: str, positions: np.ndarray, next_tokens: np.ndarray,
                  doc_ids: list[str] | np.ndarray, keys: np.ndarray) -> pa.Table:
    """One shard's archive rows: ``keys`` [n, d] at ``positions``, in that order."""
    keys = np.ascontiguousarray(keys, KEY_DTYPE)
    n, dim = keys.shape
    return pa.table([
        pa.array(np.full(n, shard_id, object), pa.string()),
        pa.array(np.asarray(positions, np.int64)),
        pa.array(np.asarray(next_tokens, np.int32)),
        pa.array(np.asarray(doc_ids, object), pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), dim),
    ], schema=archive_schema(dim))


def write_fragment(root, table: pa.Table) -> ArchiveFragment:
    """Write ``table`` as one uncommitted fragment of the archive under the local store
    directory ``root`` (on object storage: its staging directory), checksummed."""
    table = table.cast(archive_schema(table.schema.field("key").type.list_size))
    (fragment,) = lance().fragment.write_fragments(
        table, str(root / ARCHIVE_DIR), schema=table.schema,
        max_rows_per_file=max(len(table), 1), max_bytes_per_file=2**40)
    (data_file,) = fragment.files
    ref = make_file_ref(root, f"{ARCHIVE_DIR}/data/{data_file.path}")
    maybe_fail("after_fragment_write")
    return ArchiveFragment(file=ref, lance=fragment_json(fragment))


def discard_version(io: StoreIO, spec: ArchiveSpec) -> None:
    """Remove an archive version this run committed but no manifest will name (its commit
    lost the race for the generation); its fragments stay, garbage for gc unless a rerun or a
    rebased commit lists them again."""
    io.remove(spec.manifest.path)
    log.info("archive version %d discarded: its generation was committed by another writer",
             spec.version)


def commit_archive(io: StoreIO, shards: tuple[ShardInfo, ...], dim: int,
                   parent: ArchiveSpec | None = None,
                   parent_shards: tuple[ShardInfo, ...] = ()) -> ArchiveSpec | None:
    """Commit the archive version holding exactly the fragments of ``shards`` (the parent's
    version again when they are the parent's); None when no shard has a fragment."""
    fragments = [s.archive for s in shards if s.archive]
    if not fragments:
        return None
    if parent is not None and fragments == [s.archive for s in parent_shards if s.archive]:
        return parent
    lance_module = lance()
    from lance.commit import CommitConflictError as LanceConflict
    from lance.fragment import FragmentMetadata

    uri = archive_uri(io)
    operation = lance_module.LanceOperation.Overwrite(
        archive_schema(dim), [FragmentMetadata.from_json(f.lance) for f in fragments])
    maybe_fail("before_archive_commit")
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            dataset = lance_module.LanceDataset.commit(
                uri, operation, storage_options=lance_storage_options(uri) or None)
            break
        except LanceConflict:
            # Another writer committed a version first. Ours lists every fragment it holds,
            # whatever the latest version is, so committing it again as the next is safe.
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            log.info("archive version taken by another writer; committing again")
    version = dataset.version
    rel = version_relpath(version)
    with io.staged([rel]) as root:
        manifest = make_file_ref(root, rel)
    rows = sum(s.num_keys for s in shards if s.archive)
    if dataset.count_rows() != rows:
        raise RuntimeError(f"archive version {version} holds {dataset.count_rows()} rows, the "
                           f"shards {rows} keys")
    maybe_fail("after_archive_commit")
    log.info("archive version %d: %d fragments, %d keys", version, len(fragments), rows)
    return ArchiveSpec(path=ARCHIVE_DIR, version=version, manifest=manifest, rows=rows)
