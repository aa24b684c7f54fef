"""The store format: the contract between the builder (pipelines/) and the runtime (dresd/).

A store is one directory::

    STORE/
      CURRENT                     name of the live manifest, replaced atomically
      manifests/gen-000001.json   one file per generation, never rewritten
      transform/<name>.npz        fitted z-score + PCA transform (mean, std, components)
      index/<name>.faiss          trained, empty faiss IVF index (the quantizer)
      shards/<shard_id>/
        tokens.arrow              token stream, Arrow IPC file, one int32 column, memory-mappable
        docs.arrow                one row per document: content hash, source, start, length
        keys.lance/               LanceDB table: reduced key vector, position, first next token
        ivf.faiss                 the quantizer filled with this shard's keys (ids = key rows)

Shards are immutable once a manifest names them; an update or a compaction adds shards and a new
manifest generation, so a reader holding an older generation keeps working.
"""

from schemas.arrow import (
    DEAD_LETTER_SCHEMA,
    DOCS_SCHEMA,
    TOKENS_SCHEMA,
    keys_schema,
)
from schemas.manifest import (
    FORMAT_VERSION,
    FileRef,
    IndexSpec,
    Manifest,
    ModelSpec,
    ShardInfo,
    StoreFormatError,
    TransformSpec,
    file_digest,
    list_generations,
    read_manifest,
    write_manifest,
)

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "DOCS_SCHEMA",
    "FORMAT_VERSION",
    "TOKENS_SCHEMA",
    "FileRef",
    "IndexSpec",
    "Manifest",
    "ModelSpec",
    "ShardInfo",
    "StoreFormatError",
    "TransformSpec",
    "file_digest",
    "keys_schema",
    "list_generations",
    "read_manifest",
    "write_manifest",
]
