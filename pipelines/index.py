"""The faiss IVF index: a quantizer trained once on a sample, and one filled copy per shard.

Keys are unit-norm, so the index uses inner product (= cosine). Every shard's ``ivf.faiss`` is
the trained, empty quantizer filled with that shard's keys, ids = row numbers of its keys table;
an update fills the same quantizer, so shards of every generation are searched alike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import apache_beam as beam
import faiss
import numpy as np

from pipelines.documents import WrittenShard
from schemas.shard_io import INDEX_FILE, read_keys, shard_info, shard_relpath

# faiss wants about 39 training points per centroid; fewer gives poor lists and a warning.
POINTS_PER_LIST = 39


def auto_nlist(num_keys: int, train_size: int) -> int:
    """About 4 sqrt(N) lists (the usual faiss guidance), no more than the sample can train."""
    want = max(1, int(4 * math.sqrt(max(num_keys, 1))))
    return max(1, min(want, train_size // POINTS_PER_LIST))


def factory_string(kind: str, nlist: int, pq_m: int, pq_nbits: int) -> str:
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if kind == "ivf_pq":
        return f"IVF{nlist},PQ{pq_m}x{pq_nbits}"
    raise ValueError(f"unknown index kind {kind!r}")


def train_quantizer(vectors: np.ndarray, kind: str, nlist: int, pq_m: int, pq_nbits: int,
                    nprobe: int, seed: int = 0) -> faiss.Index:
    x = np.ascontiguousarray(vectors, np.float32)
    if len(x) < nlist:
        raise ValueError(f"cannot train {nlist} IVF lists on {len(x)} sampled keys")
    if kind == "ivf_pq" and len(x) < 2 ** pq_nbits:
        raise ValueError(f"cannot train {2 ** pq_nbits} PQ centroids on {len(x)} sampled keys; "
                         "lower pq_nbits or raise sample_size")
    index = faiss.index_factory(x.shape[1], factory_string(kind, nlist, pq_m, pq_nbits),
                                faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.nprobe = nprobe
    index.train(x)
    return index


def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))


def write_index(index: faiss.Index, path: str | os.PathLike) -> None:
    tmp = f"{path}.part"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def fill_shard_index(store: str, shard_id: str, quantizer: bytes) -> int:
    """Write the shard's ivf.faiss from its keys table; returns the number of keys added."""
    vectors, _, _ = read_keys(store, shard_id)
    index = index_from_bytes(quantizer)
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32),
                           np.arange(len(vectors), dtype=np.int64))
    write_index(index, Path(store) / shard_relpath(shard_id) / INDEX_FILE)
    return index.ntotal


class FillShardIndexFn(beam.DoFn):
    def __init__(self, store: str, generation: int):
        self.store = store
        self.generation = generation

    def process(self, shard: WrittenShard, fitted):
        added = fill_shard_index(self.store, shard.shard_id, fitted.quantizer)
        if added != shard.num_keys:
            raise RuntimeError(f"shard {shard.shard_id}: index holds {added} keys, "
                               f"the keys table {shard.num_keys}")
        yield shard_info(self.store, shard.shard_id, shard.num_docs, shard.num_tokens,
                         shard.num_keys, self.generation)


class FillShardIndex(beam.PTransform):
    """WrittenShards -> ShardInfos, after writing each shard's filled ivf.faiss."""

    def __init__(self, store: str, generation: int, fitted):
        super().__init__()
        self.store = str(store)
        self.generation = generation
        self.fitted = fitted  # singleton PCollection of FittedKeys

    def expand(self, shards):
        return shards | "FillIndex" >> beam.ParDo(
            FillShardIndexFn(self.store, self.generation), beam.pvalue.AsSingleton(self.fitted))
