"""Names of the files and directories of a store (see FORMAT.md beside this module).

Constants only, imported by the modules that read, write, check and collect them, so that the
layout lives in one place and no module has to import another for a name.
"""

CURRENT_FILE = "CURRENT"  # hint: the newest committed manifest (schemas.commit)
MANIFEST_DIR = "manifests"  # gen-NNNNNN.json, one per generation, never rewritten
SHARDS_DIR = "shards"
TOKENS_FILE = "tokens.arrow"
DOCS_FILE = "docs.arrow"
KEYS_FILE = "keys.npy"  # float16 [T, d]: the key archive of stores written before archive.lance
INDEX_FILE = "ivf.lists"  # the shard's inverted lists (schemas.lists)
COUNTS_FILE = "counts.npy"  # int32 [vocab]: keys per next token (how many a search can find)
ARCHIVE_DIR = "archive.lance"  # the key archive: a Lance dataset, one row per key (schemas.archive)
ARCHIVE_DATA_DIR = f"{ARCHIVE_DIR}/data"  # its fragments' data files, one per shard
ARCHIVE_VERSIONS_DIR = f"{ARCHIVE_DIR}/_versions"  # its version manifests (Lance's own)
ARCHIVE_TRANSACTIONS_DIR = f"{ARCHIVE_DIR}/_transactions"  # Lance's record of each commit
