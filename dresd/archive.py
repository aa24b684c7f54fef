"""The key archive from the user's side: the store's Lance dataset as a LanceDB table.

    import dresd
    table = dresd.open_archive("store/")       # at the version the live manifest names
    hits = (table.search(query_key).metric("dot").where("next_token = 42")
            .limit(10).to_pandas())            # shard, position, next_token, doc_id, key

The table is checked out at the archive version the manifest names (schemas.archive): a later
version is one a commit in progress or a crashed run wrote, which no generation covers. Decoding
never opens the archive; this is for inspection, analysis and re-indexing.
"""

from __future__ import annotations

import os

from schemas.archive import ARCHIVE_TABLE, lance, lance_storage_options
from schemas.errors import StoreFormatError
from schemas.manifest import read_manifest
from schemas.storage import store_io


def open_archive(store: str | os.PathLike, generation: int | None = None):
    """The key archive of ``store`` (a directory or ``s3://`` URL) as a ``lancedb`` table, at
    the version the live manifest (or ``generation``'s) names."""
    io = store_io(store)
    manifest = read_manifest(io, generation)
    if manifest.archive is None:
        raise StoreFormatError(f"store {io.where()} generation {manifest.generation} keeps no "
                               "key archive (it was built with --no-archive)")
    lance()  # its logger quieted before LanceDB loads it
    import lancedb

    location = io.where()
    db = lancedb.connect(location, storage_options=lance_storage_options(location) or None)
    table = db.open_table(ARCHIVE_TABLE)
    table.checkout(manifest.archive.version)
    return table
