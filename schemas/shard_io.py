"""Reading and writing one shard's files. Both sides use these, so the layout lives in one place.

Writers build a shard in a hidden temporary directory and rename it into place when every file
is complete, so a crash never leaves a half-written shard under a real name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from schemas.arrow import DOCS_SCHEMA, TOKENS_SCHEMA
from schemas.atomic import replacing
from schemas.errors import StoreFormatError
from schemas.layout import (  # noqa: F401 - the shard layout, re-exported for the writers
    COUNTS_FILE,
    DOCS_FILE,
    INDEX_FILE,
    KEYS_FILE,
    SHARDS_DIR,
    TOKENS_FILE,
)
from schemas.manifest import ArchiveFragment, FileRef, ShardInfo, make_file_ref

KEY_DTYPE = np.float16  # keys need no more: they are searched through 8-bit PQ codes


def new_shard_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def shard_relpath(shard_id: str) -> str:
    return f"{SHARDS_DIR}/{shard_id}"


@dataclass
class ShardData:
    """A shard in memory: the token stream, its documents, and one key per position."""

    tokens: np.ndarray  # int32 [T]
    doc_ids: list[str]
    sources: list[str]
    starts: np.ndarray  # int64 [D]
    lengths: np.ndarray  # int32 [D]
    vectors: np.ndarray | None  # [T, d] key of every position (a document's last: unused);
    #                             written to the archive, not with the shard


def key_positions(starts: np.ndarray, lengths: np.ndarray, num_tokens: int) -> np.ndarray:
    """Positions that have a key: every token but each document's last (it predicts nothing
    stored)."""
    has_next = np.ones(num_tokens, bool)
    ends = np.asarray(starts, np.int64) + np.asarray(lengths, np.int64)
    has_next[ends[ends > 0] - 1] = False
    return np.flatnonzero(has_next).astype(np.int64)


def _write_ipc(path: Path, table: pa.Table) -> None:
    # One record batch, no compression: the runtime memory-maps it as one contiguous array.
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table, max_chunksize=max(1, table.num_rows))


def write_shard(store: str | os.PathLike, data: ShardData, shard_id: str | None = None) -> str:
    """Write the tokens and docs of one shard; returns the shard id. Its keys go into the
    archive (pipelines.archive), its inverted lists are written by the builder's fill step."""
    shard_id = shard_id or new_shard_id()
    final = Path(store) / shard_relpath(shard_id)
    if final.exists():
        raise StoreFormatError(f"shard {shard_id} already exists in {store}")
    tmp = final.with_name(f".{shard_id}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _write_ipc(
            tmp / TOKENS_FILE,
            pa.table({"token": pa.array(np.asarray(data.tokens, np.int32))}, schema=TOKENS_SCHEMA),
        )
        _write_ipc(
            tmp / DOCS_FILE,
            pa.table(
                {
                    "doc_id": pa.array(data.doc_ids, pa.string()),
                    "source": pa.array(data.sources, pa.string()),
                    "start": pa.array(np.asarray(data.starts, np.int64)),
                    "length": pa.array(np.asarray(data.lengths, np.int32)),
                },
                schema=DOCS_SCHEMA,
            ),
        )
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return shard_id


def read_tokens(store: str | os.PathLike, shard_id: str, mmap: bool = True) -> np.ndarray:
    return open_tokens(Path(store) / shard_relpath(shard_id) / TOKENS_FILE, mmap)


def open_tokens(path: Path, mmap: bool = True) -> np.ndarray:
    """The int32 token stream in the Arrow file at ``path`` (memory-mapped by default)."""
    source = pa.memory_map(str(path)) if mmap else pa.OSFile(str(path))
    table = ipc.open_file(source).read_all()
    if table.schema != TOKENS_SCHEMA:
        raise StoreFormatError(f"{path}: schema {table.schema} is not the token stream schema")
    col = table.column("token")
    if col.num_chunks == 0:
        return np.zeros(0, np.int32)
    if col.num_chunks != 1:
        col = pa.chunked_array([col.combine_chunks()])
    return col.chunk(0).to_numpy(zero_copy_only=True)


def read_docs(store: str | os.PathLike, shard_id: str) -> pa.Table:
    return open_docs(Path(store) / shard_relpath(shard_id) / DOCS_FILE)


def open_docs(path: Path) -> pa.Table:
    return ipc.open_file(pa.memory_map(str(path))).read_all()


def shard_path(store: str | os.PathLike, shard_id: str, name: str) -> Path:
    return Path(store) / shard_relpath(shard_id) / name


def write_counts(store: str | os.PathLike, shard_id: str, counts: np.ndarray) -> None:
    with replacing(shard_path(store, shard_id, COUNTS_FILE)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(counts, np.int32))


def read_counts(store: str | os.PathLike, shard_id: str, vocab_size: int,
                num_keys: int | None = None) -> np.ndarray:
    """Keys per next token [vocab_size], memory-mapped, with its shape and (when ``num_keys``
    is given) its total checked."""
    return open_counts(shard_path(store, shard_id, COUNTS_FILE), vocab_size, num_keys)


def open_counts(path: Path, vocab_size: int, num_keys: int | None = None) -> np.ndarray:
    try:
        counts = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise StoreFormatError(f"{path} is not a counts array: {e}") from None
    if counts.dtype != np.int32 or counts.shape != (vocab_size,):
        raise StoreFormatError(f"{path}: {counts.dtype} {counts.shape}, not int32 "
                               f"[{vocab_size}]")
    if num_keys is not None and (int(counts.sum(dtype=np.int64)) != num_keys
                                 or int(counts.min()) < 0):
        raise StoreFormatError(f"{path}: counts do not add up to the shard's {num_keys} keys")
    return counts


def shard_info(
    store: str | os.PathLike, shard_id: str, num_docs: int, num_tokens: int, num_keys: int,
    generation_added: int, archive: ArchiveFragment | None = None,
    lists_name: str = INDEX_FILE,
) -> ShardInfo:
    """Checksum a complete shard (tokens, docs, inverted lists ``lists_name``, counts); its
    archive fragment, when kept, was checksummed when it was written."""
    rel = shard_relpath(shard_id)

    def ref(name: str) -> FileRef:
        return make_file_ref(store, f"{rel}/{name}")

    return ShardInfo(
        shard_id=shard_id,
        num_docs=num_docs,
        num_tokens=num_tokens,
        num_keys=num_keys,
        tokens=ref(TOKENS_FILE),
        docs=ref(DOCS_FILE),
        index=ref(lists_name),
        counts=ref(COUNTS_FILE),
        archive=archive,
        generation_added=generation_added,
    )
