"""Compaction: merge consecutive small shards into larger ones, as a new generation.

Merged shards are new, immutable shards: token streams concatenated, document starts rebased,
and the inverted lists merged list by list on disk (ids rebased by the same offset, which moves
only their position bits, each list re-sorted by id), so compaction needs neither the model nor
the float keys. The key archive follows: the merged shards' fragments are read, their rows given
the new shard id and rebased positions, and written as the new shard's fragment, so the
generation's archive version holds every key once, under the shard that serves it. The shards
(and fragments) they replace stay on disk for readers of older generations.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.archive import write_fragment
from pipelines.documents import FilledShard
from pipelines.faults import maybe_fail
from pipelines.fit import load_fitted
from pipelines.journal import RunJournal
from pipelines.publish import RecordResult
from schemas import Manifest, ShardInfo, StoreFormatError
from schemas.archive import fragment_rows
from schemas.lists import MAX_POSITION, ListsFile, write_lists
from schemas.shard_io import (
    INDEX_FILE,
    ShardData,
    read_counts,
    read_docs,
    read_tokens,
    shard_info,
    shard_path,
    write_counts,
    write_shard,
)
from schemas.storage import staged


def plan_merges(shards: tuple[ShardInfo, ...], shard_tokens: int) -> list[list[ShardInfo]]:
    """Consecutive groups of shards, each up to ``shard_tokens`` tokens (a big shard alone)."""
    groups: list[list[ShardInfo]] = []
    size = 0
    for s in shards:
        if groups and size + s.num_tokens <= shard_tokens:
            groups[-1].append(s)
            size += s.num_tokens
        else:
            groups.append([s])
            size = s.num_tokens
    return groups


def merge_shards(shards: list[ShardInfo], store: str, nlist: int, code_size: int,
                 vocab_size: int, generation: int) -> ShardInfo:
    """Merge ``shards`` into one new shard; on a remote store their files are fetched into a
    local staging directory, merged there, and the new shard uploaded (schemas.storage)."""
    archived = all(s.archive is not None for s in shards)
    fetch = [f.path for s in shards
             for f in s.serving_files() + ((s.archive.file,) if archived else ())]
    with staged(store, fetch) as root:
        return _merge_shards(shards, root, nlist, code_size, vocab_size, generation)


def _merge_shards(shards: list[ShardInfo], store, nlist: int, code_size: int,
                  vocab_size: int, generation: int) -> ShardInfo:
    tokens, doc_ids, sources, starts, lengths, offsets = [], [], [], [], [], []
    offset = 0
    for s in shards:
        t = np.asarray(read_tokens(store, s.shard_id, mmap=False))
        docs = read_docs(store, s.shard_id)
        tokens.append(t)
        doc_ids += docs.column("doc_id").to_pylist()
        sources += docs.column("source").to_pylist()
        starts.append(docs.column("start").to_numpy() + offset)
        lengths.append(docs.column("length").to_numpy())
        offsets.append(offset)
        offset += len(t)
    if offset >= MAX_POSITION:
        raise StoreFormatError(f"a merged shard of {offset} tokens exceeds the {MAX_POSITION} "
                               "positions an index id can address; lower --shard-tokens")
    data = ShardData(
        tokens=np.concatenate(tokens), doc_ids=doc_ids, sources=sources,
        starts=np.concatenate(starts), lengths=np.concatenate(lengths), vectors=None,
    )
    shard_id = write_shard(store, data)
    maybe_fail("after_shard_write")
    del tokens, data

    lists = [ListsFile(Path(store) / s.index.path, nlist, code_size) for s in shards]
    sizes = np.sum([f.header.sizes for f in lists], axis=0)

    def merged():
        for i in range(nlist):
            parts = [(f.list(i), off) for f, off in zip(lists, offsets) if f.header.sizes[i]]
            if not parts:
                yield np.zeros((0, code_size), np.uint8), np.zeros(0, np.int64)
                continue
            codes = np.concatenate([c for (c, _), _ in parts])
            ids = np.concatenate([ids + off for (_, ids), off in parts])
            order = np.argsort(ids, kind="stable")
            yield codes[order], ids[order]

    write_lists(shard_path(store, shard_id, INDEX_FILE), nlist, code_size, sizes, merged())
    counts = np.zeros(vocab_size, np.int64)
    for s in shards:
        counts += read_counts(store, s.shard_id, vocab_size, s.num_keys)
    write_counts(store, shard_id, counts)
    fragment = None
    if all(s.archive is not None for s in shards):  # every part has its keys: so does the merge
        fragment = write_fragment(store, _merged_archive(store, shards, offsets, shard_id))
    return shard_info(store, shard_id, len(doc_ids), offset, sum(s.num_keys for s in shards),
                      generation, fragment)


def _merged_archive(store, shards: list[ShardInfo], offsets: list[int], shard_id: str):
    """The parts' archive rows under the merged shard's id, positions rebased."""
    parts = []
    for s, off in zip(shards, offsets):
        rows = fragment_rows(store, s.archive.file.path)
        if rows.num_rows != s.num_keys:
            raise StoreFormatError(f"archive fragment {s.archive.file.path} of shard "
                                   f"{s.shard_id}: {rows.num_rows} rows for {s.num_keys} keys")
        parts.append(rows.set_column(0, "shard", pa.array([shard_id] * rows.num_rows))
                     .set_column(1, "position", pc.add(rows.column("position"), off)))
    return pa.concat_tables(parts)


def run_compaction(p: beam.Pipeline, store: str, current: Manifest,
                   groups: list[list[ShardInfo]], journal: RunJournal) -> None:
    """Merge the groups of more than one shard; the merged shards go to the run's result."""
    generation = current.generation + 1
    merges = [g for g in groups if len(g) > 1]
    fitted = p | "FittedKeys" >> beam.Create([load_fitted(store, current)])
    index = current.index
    code_size = index.code_size
    if not code_size:
        first = current.shards[0]
        with staged(store, [first.index.path]) as root:
            code_size = ListsFile(Path(root) / first.index.path).header.code_size
    _ = (
        p
        | "Groups" >> beam.Create(merges)
        | "Merge" >> beam.Map(merge_shards, store, index.nlist, code_size,
                              current.model.vocab_size, generation)
        # the merged lists are the parts' lists, written with the store's quantizer
        | "Filled" >> beam.Map(FilledShard, index.quantizer.sha256)
        | "Record" >> RecordResult(journal, fitted)
    )
