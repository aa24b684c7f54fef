"""The key archive: every key a build encoded, in float16, as one Lance dataset per store.

``STORE/archive.lance`` holds one row per key (``ARCHIVE_COLUMNS``): the shard and position it
belongs to, the token that follows it, its document and the key itself. Each shard's rows are one
Lance fragment of one data file, written by the worker that encoded the shard (Lance's
distributed write: fragments written in parallel, committed once). The launcher commits an
archive version holding exactly the fragments of a generation's shards, then the generation's
manifest, which names that version (``Manifest.archive``) and checksums its files: a dataset
version no manifest names is a commit in progress or one a crash interrupted, never read by
dresd and removed by ``dresd gc``.

The serving set never reads the archive. The builder reads it to fill a shard's inverted lists
(the fill step takes its keys from the shard's fragment), to train a quantizer (``dresd
reindex``), and to merge shards (``dresd compact``); users open it with ``lancedb`` at the version
the manifest names (``dresd.open_archive``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.errors import StoreFormatError
from schemas.layout import ARCHIVE_DIR, ARCHIVE_VERSIONS_DIR
from schemas.storage import StoreIO, scheme

ARCHIVE_TABLE = ARCHIVE_DIR.removesuffix(".lance")  # its name as a LanceDB table
_U64_MAX = 2**64 - 1


def archive_schema(dim: int) -> pa.Schema:
    """The archive's columns: one row per key."""
    return pa.schema([
        pa.field("shard", pa.string(), nullable=False),  # shard id
        pa.field("position", pa.int64(), nullable=False),  # the key's position in the shard
        pa.field("next_token", pa.int32(), nullable=False),  # the token at position + 1
        pa.field("doc_id", pa.string(), nullable=False),  # the document's content hash
        pa.field("key", pa.list_(pa.float16(), dim), nullable=False),  # unit-norm, d floats
    ])


ARCHIVE_COLUMNS = tuple(archive_schema(1).names)


def lance():
    """The ``lance`` module, its Rust logger limited to errors (Lance warns, on every write of
    a fragment before the dataset's first commit, that the dataset does not exist yet)."""
    os.environ.setdefault("LANCE_LOG", "error")
    import lance as lance_module

    return lance_module


def lance_storage_options(location: str) -> dict[str, str]:
    """Lance's object-store options for a store URL, from the same environment the fsspec side
    reads (schemas.storage.storage_options): the S3 endpoint of a server other than AWS, and
    plain HTTP where that endpoint uses it. Credentials and region Lance reads from the
    ``AWS_*`` variables itself."""
    if scheme(location) not in ("s3", "s3a"):
        return {}
    opts: dict[str, str] = {}
    endpoint = (os.environ.get("DRESD_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        opts["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["aws_region"] = region
    return opts


def archive_uri(io: StoreIO) -> str:
    """The archive dataset's location: a local absolute path or an ``s3://`` URL."""
    return io.where(ARCHIVE_DIR)


def version_relpath(version: int) -> str:
    """The store-relative path of an archive version's manifest (Lance's naming: u64 max minus
    the version, 20 digits, so the newest sorts first)."""
    return f"{ARCHIVE_VERSIONS_DIR}/{_U64_MAX - version:020d}.manifest"


def version_of(name: str) -> int | None:
    """The version a file name of ``_versions/`` stands for; None for anything else."""
    stem = name.removesuffix(".manifest")
    if stem == name or not stem.isdigit():
        return None
    number = int(stem)
    return _U64_MAX - number if len(stem) == 20 else number  # Lance's newer and older naming


def fragment_rows(root: str | os.PathLike, relpath: str, rows: np.ndarray | None = None,
                  ) -> pa.Table:
    """The rows of one fragment's data file under a local store directory ``root`` (all of
    them, or ``rows``), read with Lance's file reader: the fragment need not be committed."""
    from lance.file import LanceFileReader

    lance()
    path = Path(root) / relpath
    try:
        reader = LanceFileReader(str(path))
        table = (reader.take_rows(np.asarray(rows, np.uint64)) if rows is not None
                 else reader.read_all()).to_table()
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise StoreFormatError(f"{path}: not a readable Lance data file ({e})") from None
    if tuple(table.schema.names) != ARCHIVE_COLUMNS:
        raise StoreFormatError(f"{path}: columns {table.schema.names}, not the archive's "
                               f"{list(ARCHIVE_COLUMNS)}")
    return table


def keys_of(table: pa.Table) -> np.ndarray:
    """The ``key`` column as float16 [rows, d]."""
    column = table.column("key").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def fragment_json(fragment) -> str:
    """A Lance FragmentMetadata as the JSON text a manifest records."""
    return json.dumps(fragment.to_json(), sort_keys=True, separators=(",", ":"))


def read_shard_keys(root: str | os.PathLike, shard) -> tuple[np.ndarray, np.ndarray]:
    """(positions, float16 keys [n, d]) of a shard's fragment under the local store directory
    ``root`` (``shard``: a ShardInfo whose ``archive`` is set)."""
    if shard.archive is None:
        raise StoreFormatError(f"shard {shard.shard_id} has no key archive")
    rows = fragment_rows(root, shard.archive.file.path)
    return rows.column("position").to_numpy(), keys_of(rows)
