"""Keep one copy of each document, and drop documents a store already holds (by content hash).

The corpus is read twice (pipelines.build): the first read finds which documents to drop, the
second reads the rest and hands them on to tokenization and encoding. Only (content hash,
source) pairs go through the grouping and only the dropped sources come out of it, so nothing
that grows with the corpus's text is held at once: the text of a batch of files is read, used
and let go in each pass.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np

from pipelines.stage_clock import NAMESPACE, stage_clock
from schemas.shard_io import DOCS_FILE, read_docs, shard_relpath
from schemas.storage import staged, store_io


def source_key(source: str) -> int:
    """64 bits of a source's hash. Two of a corpus's sources share one with probability about
    n^2 / 2^65 (1e-9 for a million sources); a shared key would drop both documents."""
    return int.from_bytes(hashlib.blake2b(source.encode("utf-8"), digest_size=8).digest(),
                          "little")


class DroppedSources:
    """The sources of documents the second read skips: 8 bytes each, searched in log time."""

    def __init__(self, keys):
        self.keys = np.unique(np.asarray(list(keys), np.uint64))

    def __contains__(self, source: str) -> bool:
        k = np.uint64(source_key(source))
        i = int(np.searchsorted(self.keys, k))
        return i < len(self.keys) and self.keys[i] == k

    def __len__(self) -> int:
        return len(self.keys)


def known_doc_ids(shard_id: str, store: str):
    with stage_clock("dedupe"), staged(store, [f"{shard_relpath(shard_id)}/{DOCS_FILE}"]) as root:
        ids = read_docs(root, shard_id).column("doc_id").to_pylist()
    for doc_id in ids:
        yield doc_id, True


def id_and_source(doc):
    with stage_clock("dedupe"):
        return doc.doc_id, doc.source


def dropped_copies(item):
    """The source keys of a content hash's copies to drop: all when the store holds it, all
    but the first source in sorted order otherwise (the same copy on every runner)."""
    with stage_clock("dedupe"):
        _, groups = item
        sources = sorted(groups["new"])
        if not sources:
            drop = []
        elif list(groups["known"]):
            beam.metrics.Metrics.counter(NAMESPACE, "documents_already_in_store").inc(
                len(sources))
            drop = sources
        else:
            if len(sources) > 1:
                beam.metrics.Metrics.counter(NAMESPACE, "duplicate_documents").inc(
                    len(sources) - 1)
            drop = sources[1:]
        keys = [source_key(s) for s in drop]
    yield from keys


class FindDroppedSources(beam.PTransform):
    """Documents -> one DroppedSources: the copies of documents this corpus repeats and the
    documents the store's ``shard_ids`` already hold."""

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
        new = docs | "IdAndSource" >> beam.Map(id_and_source)
        return (
            {"new": new, "known": known}
            | "Join" >> beam.CoGroupByKey()
            | "Dropped" >> beam.FlatMap(dropped_copies)
            | "Collect" >> beam.combiners.ToList()
            | "AsSet" >> beam.Map(DroppedSources)
        )
