"""The store format: the contract between the builder (pipelines/) and the runtime (dresd/).

A store is one directory, or the same layout under a prefix on object storage
(``s3://bucket/prefix``, schemas.storage)::

    STORE/
      CURRENT                     name of the live manifest, replaced atomically
      manifests/gen-000001.json   one file per generation, never rewritten
      transform/<name>.npz        fitted z-score + PCA transform (mean, std, components)
      index/<name>.faiss          trained, empty faiss IVF index (HNSW coarse quantizer + codec)
      verified/                   records of `dresd verify` (checksums already checked)
      shards/<shard_id>/
        tokens.arrow              token stream, Arrow IPC file, one int32 column, memory-mapped
        docs.arrow                one row per document: content hash, source, start, length
        ivf.lists                 the shard's inverted lists: compressed key codes + packed ids
                                  (next_token << 40 | position), ascending ids per list
      archive.lance/              the key archive: a Lance dataset, one row per key (shard,
                                  position, next token, document, float16 key), a fragment per
                                  shard; each manifest names its version (schemas.archive)

Serving set (what the runtime maps): tokens.arrow + ivf.lists + docs.arrow per shard, plus the
transform and the quantizer once. Shards are immutable once a manifest names them; an update or
a compaction adds shards and a new manifest generation, so a reader holding an older generation
keeps working. Format 2; format-1 stores are refused with the command that converts them.
"""

from schemas.arrow import (
    DEAD_LETTER_SCHEMA,
    DOCS_SCHEMA,
    TOKENS_SCHEMA,
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
    "list_generations",
    "read_manifest",
    "write_manifest",
]
