"""Compaction: merge consecutive small shards into larger ones, as a new generation.

Merged shards are new, immutable shards (token streams concatenated, key positions rebased);
the shards they replace stay on disk for readers of older generations.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.documents import WrittenShard
from pipelines.faults import maybe_fail
from pipelines.fit import load_fitted
from pipelines.index import FillShardIndex
from pipelines.journal import RunJournal
from pipelines.publish import RecordResult
from schemas import Manifest, ShardInfo
from schemas.shard_io import ShardData, read_docs, read_keys, read_tokens, write_shard


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


def merge_shards(shard_ids: list[str], store: str) -> WrittenShard:
    tokens, doc_ids, sources, starts, lengths = [], [], [], [], []
    vectors, pos, next_token = [], [], []
    offset = 0
    for sid in shard_ids:
        t = np.asarray(read_tokens(store, sid, mmap=False))
        docs = read_docs(store, sid)
        v, p, n = read_keys(store, sid)
        tokens.append(t)
        doc_ids += docs.column("doc_id").to_pylist()
        sources += docs.column("source").to_pylist()
        starts.append(docs.column("start").to_numpy() + offset)
        lengths.append(docs.column("length").to_numpy())
        vectors.append(v)
        pos.append(p + offset)
        next_token.append(n)
        offset += len(t)
    data = ShardData(
        tokens=np.concatenate(tokens), doc_ids=doc_ids, sources=sources,
        starts=np.concatenate(starts), lengths=np.concatenate(lengths),
        vectors=np.concatenate(vectors), pos=np.concatenate(pos),
        next_token=np.concatenate(next_token),
    )
    shard_id = write_shard(store, data)
    maybe_fail("after_shard_write")
    return WrittenShard(shard_id, len(doc_ids), len(data.tokens), len(data.pos))


def run_compaction(p: beam.Pipeline, store: str, current: Manifest,
                   groups: list[list[ShardInfo]], journal: RunJournal) -> None:
    """Merge the groups of more than one shard; the merged shards go to the run's result."""
    generation = current.generation + 1
    merges = [[s.shard_id for s in g] for g in groups if len(g) > 1]
    fitted = p | "FittedKeys" >> beam.Create([load_fitted(store, current)])
    _ = (
        p
        | "Groups" >> beam.Create(merges)
        | "Merge" >> beam.Map(merge_shards, store)
        | "FillShardIndex" >> FillShardIndex(store, generation, fitted)
        | "Record" >> RecordResult(journal, fitted)
    )
