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

from schemas.arrow import DOCS_SCHEMA, TOKENS_SCHEMA, keys_schema
from schemas.manifest import FileRef, ShardInfo, StoreFormatError, make_file_ref

SHARDS_DIR = "shards"
TOKENS_FILE = "tokens.arrow"
DOCS_FILE = "docs.arrow"
KEYS_DIR = "keys.lance"
KEYS_TABLE = "keys"
INDEX_FILE = "ivf.faiss"


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
    vectors: np.ndarray  # float16 [K, d]
    pos: np.ndarray  # int64 [K]
    next_token: np.ndarray  # int32 [K]


def _write_ipc(path: Path, table: pa.Table) -> None:
    # One record batch, no compression: the runtime memory-maps it as one contiguous array.
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table, max_chunksize=max(1, table.num_rows))


def write_shard(store: str | os.PathLike, data: ShardData, shard_id: str | None = None) -> str:
    """Write tokens, docs and keys of one shard; returns the shard id. The index is separate."""
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
        vectors = np.ascontiguousarray(data.vectors, dtype=np.float16)
        dim = vectors.shape[1]
        import lancedb

        keys = pa.table(
            {
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
                "pos": pa.array(np.asarray(data.pos, np.int64)),
                "next_token": pa.array(np.asarray(data.next_token, np.int32)),
            },
            schema=keys_schema(dim),
        )
        lancedb.connect(str(tmp)).create_table(KEYS_TABLE, keys)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return shard_id


def read_tokens(store: str | os.PathLike, shard_id: str, mmap: bool = True) -> np.ndarray:
    path = Path(store) / shard_relpath(shard_id) / TOKENS_FILE
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
    path = Path(store) / shard_relpath(shard_id) / DOCS_FILE
    return ipc.open_file(pa.memory_map(str(path))).read_all()


def read_keys(store: str | os.PathLike, shard_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors float16 [K, d], pos int64 [K], next_token int32 [K]) of a shard."""
    import lancedb

    table = lancedb.connect(str(Path(store) / shard_relpath(shard_id))).open_table(KEYS_TABLE)
    t = table.to_arrow()
    vec = t.column("vector").combine_chunks()
    dim = vec.type.list_size
    vectors = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    pos = t.column("pos").to_numpy()
    nxt = t.column("next_token").to_numpy()
    return vectors, pos, nxt


def shard_info(
    store: str | os.PathLike, shard_id: str, num_docs: int, num_tokens: int, num_keys: int,
    generation_added: int,
) -> ShardInfo:
    """Checksum a complete shard (tokens, docs, keys and index) for the manifest."""
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
        keys=ref(KEYS_DIR),
        index=ref(INDEX_FILE),
        generation_added=generation_added,
    )
