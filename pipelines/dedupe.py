"""Keep one copy of each document, and drop documents a store already holds (by content hash)."""

from __future__ import annotations

import apache_beam as beam

from schemas.shard_io import DOCS_FILE, read_docs, shard_relpath
from schemas.storage import staged, store_io

NAMESPACE = "dresd"


def known_doc_ids(shard_id: str, store: str):
    with staged(store, [f"{shard_relpath(shard_id)}/{DOCS_FILE}"]) as root:
        ids = read_docs(root, shard_id).column("doc_id").to_pylist()
    for doc_id in ids:
        yield doc_id, True


def keep_new(item):
    _, groups = item
    copies = list(groups["new"])
    if not copies:
        return
    if list(groups["known"]):
        beam.metrics.Metrics.counter(NAMESPACE, "documents_already_in_store").inc(len(copies))
        return
    if len(copies) > 1:
        beam.metrics.Metrics.counter(NAMESPACE, "duplicate_documents").inc(len(copies) - 1)
    yield copies[0]


class DropKnownDocuments(beam.PTransform):
    """Documents -> documents whose content hash is new to the store and to this corpus."""

    def __init__(self, store: str, shard_ids: list[str]):
        super().__init__()
        self.store = store_io(store)
        self.shard_ids = list(shard_ids)

    def expand(self, docs):
        known = (
            docs.pipeline
            | "ExistingShards" >> beam.Create(self.shard_ids, reshuffle=False)
            | "KnownIds" >> beam.FlatMap(known_doc_ids, self.store)
        )
        new = docs | "KeyById" >> beam.Map(lambda d: (d.doc_id, d))
        return (
            {"new": new, "known": known}
            | "Join" >> beam.CoGroupByKey()
            | "KeepNew" >> beam.FlatMap(keep_new)
        )
