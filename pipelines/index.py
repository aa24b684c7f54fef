"""The faiss index: a quantizer trained once on stored keys, and one set of inverted lists per
shard.

The quantizer is ``IVF<nlist>_HNSW32,PQ<m>x<nbits>`` with inner product (keys are unit-norm, so
that is cosine): an HNSW graph over the list centroids assigns a key or a query in a time that
barely grows with ``nlist``, and each key is stored as an ``m``-byte PQ code of its residual. It is
trained once, after the first build's shards are encoded, on keys sampled from them (no extra
forward passes), and written to ``index/`` as a trained, empty index. Every shard's ``ivf.lists``
holds only that shard's inverted lists (codes + packed ids, schemas.lists), filled with this
quantizer; an update fills the same one, so shards of every generation are searched alike and
the quantizer is stored and loaded once, not once per shard.

Sizes grow with the store: about 4 sqrt(N) lists (``auto_nlist``), trained on ``POINTS_PER_LIST``
keys per list (``auto_train_size``). Past ``TWO_LEVEL_FROM`` lists the centroids come from a
two-level k-means (sqrt(nlist) coarse clusters, then each split in proportion to its points),
whose cost grows as nlist^1.5 instead of nlist^2.
"""

from __future__ import annotations

import logging
import math
import os

import apache_beam as beam
import faiss
import numpy as np
import pyarrow.compute as pc

from pipelines.documents import FilledShard, WrittenShard
from pipelines.heap import release_free_heap
from pipelines.stage_clock import stage_clock
from schemas import StoreFormatError
from schemas.archive import fragment_rows, keys_of
from schemas.atomic import replacing
from schemas.lists import ListsFile, check_vocab, pack_ids
from schemas.manifest import ArchiveFragment
from schemas.shard_io import (
    COUNTS_FILE,
    DOCS_FILE,
    INDEX_FILE,
    TOKENS_FILE,
    key_positions,
    read_docs,
    read_tokens,
    shard_info,
    shard_path,
    shard_relpath,
    write_counts,
)
from schemas.storage import staged, store_io

log = logging.getLogger(__name__)

# k-means wants about 39 training points per centroid; fewer gives poor lists and a warning.
POINTS_PER_LIST = 39
MIN_TRAIN = 65_536  # keys sampled for training even when few lists would need fewer
MAX_TRAIN = 4 * 2**20  # ~4.2M keys: enough for ~107k lists (N ~ 700M); training stays minutes
PQ_TRAIN = 131_072  # points the PQ codebooks are trained on (256 codes x 512)
TWO_LEVEL_FROM = 1024  # lists from which the centroids come from a two-level k-means
HNSW_M = 32
ADD_CHUNK = 65_536
# The HNSW beam that assigns each key to its list at fill time. Assignment is most of the fill's
# CPU (12.3 of 14.2 us/key at 40k lists, 100M tokens, ef 16); at ef 8 it costs 7.4 us, and
# 94.7% of keys land in the same list as at ef 16, the rest in a near one that a query's
# nprobe lists still reach: recall@10 on a 3.5M-key shard of the 100M store, 1000 queries of
# another shard, nprobe 16: 0.352 (ef 16), 0.347 (ef 8), 0.341 (ef 4). Queries use their own,
# wider beam (dresd.search).
ASSIGN_EF_SEARCH = 8


def auto_nlist(num_keys: int, train_size: int) -> int:
    """About 4 sqrt(N) lists (the usual faiss guidance), no more than the sample can train."""
    want = max(1, int(4 * math.sqrt(max(num_keys, 1))))
    return max(1, min(want, train_size // POINTS_PER_LIST))


def auto_train_size(num_keys: int) -> int:
    """Keys to train on: enough for ``auto_nlist``'s lists, all keys of a small store."""
    want = POINTS_PER_LIST * max(1, int(4 * math.sqrt(max(num_keys, 1))))
    return int(min(num_keys, min(MAX_TRAIN, max(MIN_TRAIN, want))))


def auto_pq_m(dim: int) -> int:
    """4 dimensions per PQ sub-quantizer: 16 one-byte codes for d = 64."""
    per = next(p for p in (4, 2, 1) if dim % p == 0)
    return dim // per


def factory_string(kind: str, nlist: int, pq_m: int, pq_nbits: int) -> str:
    coarse = f"IVF{nlist}_HNSW{HNSW_M}"
    if kind == "ivf_flat":
        return f"{coarse},Flat"
    if kind == "ivf_pq":
        return f"{coarse},PQ{pq_m}x{pq_nbits}"
    raise ValueError(f"unknown index kind {kind!r}")


def two_level_centroids(x: np.ndarray, nlist: int, seed: int, niter: int = 20) -> np.ndarray:
    """nlist spherical k-means centroids: sqrt(nlist) coarse clusters, each split into a number
    of centroids proportional to its points."""
    d = x.shape[1]
    nc1 = max(1, int(round(math.sqrt(nlist))))
    km = faiss.Kmeans(d, nc1, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=1024)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    counts = np.bincount(assign, minlength=nc1)
    # centroids per coarse cluster, proportional to its points, at least 1 where it has points
    share = np.floor(counts / counts.sum() * nlist).astype(np.int64)
    share = np.minimum(np.maximum(share, (counts > 0).astype(np.int64)), counts)
    short = nlist - share.sum()
    room = counts - share
    for c in np.argsort(-(counts / counts.sum() * nlist - share)):
        if short <= 0:
            break
        add = min(short, room[c])
        share[c] += add
        short -= add
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for c in range(nc1):
        if share[c] == 0:
            continue
        sub = x[order[bounds[c] : bounds[c + 1]]]
        if share[c] >= len(sub):
            out.append(sub[: share[c]])
            continue
        k2 = faiss.Kmeans(d, int(share[c]), niter=niter, seed=seed + c + 1, spherical=True,
                          max_points_per_centroid=256)
        k2.train(np.ascontiguousarray(sub))
        out.append(k2.centroids)
    centroids = np.ascontiguousarray(np.concatenate(out), np.float32)
    if len(centroids) != nlist:
        raise RuntimeError(f"two-level k-means made {len(centroids)} centroids, not {nlist}")
    return centroids


def train_quantizer(vectors: np.ndarray, kind: str, nlist: int, pq_m: int, pq_nbits: int,
                    nprobe: int, seed: int = 0) -> faiss.Index:
    """A trained, empty index over unit keys ``vectors`` [n, d]."""
    x = np.ascontiguousarray(vectors, np.float32)
    if len(x) < nlist:
        raise ValueError(f"cannot train {nlist} IVF lists on {len(x)} sampled keys")
    if kind == "ivf_pq" and len(x) < 2 ** pq_nbits:
        raise ValueError(f"cannot train {2 ** pq_nbits} PQ centroids on {len(x)} sampled keys; "
                         "lower pq_nbits or raise sample_size")
    index = faiss.index_factory(x.shape[1], factory_string(kind, nlist, pq_m, pq_nbits),
                                faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.nprobe = nprobe
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training arranges codes for Hamming-distance filtering, which inner-product
        # search never uses, and it takes most of the training time.
        ivf.do_polysemous_training = False
    rng = np.random.default_rng(seed)
    if nlist >= TWO_LEVEL_FROM:
        centroids = two_level_centroids(x, nlist, seed)
        ivf.quantizer.add(centroids)
        ivf.quantizer.is_trained = True
    # With the centroids in place, train() only trains the codec (on a subsample).
    sub = x if len(x) <= PQ_TRAIN else x[np.sort(rng.choice(len(x), PQ_TRAIN, replace=False))]
    if ivf.quantizer.ntotal == nlist:
        index.train(sub)
    else:
        index.train(x)
    return index


def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))


def write_index(index: faiss.Index, path: str | os.PathLike) -> None:
    with replacing(path) as tmp:
        faiss.write_index(index, str(tmp))


def code_size(index: faiss.Index) -> int:
    return int(faiss.extract_index_ivf(index).code_size)


def fill_lists(quantizer: faiss.Index, keys: np.ndarray, tokens: np.ndarray,
               positions: np.ndarray, path: str | os.PathLike) -> int:
    """Write ``path`` (ivf.lists): ``keys`` (row i: the key at ``positions[i]``) encoded by
    ``quantizer``, ids packed from (tokens[position + 1], position), every list in ascending id
    order."""
    index = quantizer  # trained and empty, filled here
    coarse = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(coarse, faiss.IndexHNSW):  # on this copy; the store's quantizer file is
        coarse.hnsw.efSearch = ASSIGN_EF_SEARCH  # never rewritten by a fill
    ids = pack_ids(tokens[positions + 1], positions)
    order = np.argsort(ids, kind="stable")  # added in id order, so each list ends up sorted
    for start in range(0, len(order), ADD_CHUNK):
        rows = order[start : start + ADD_CHUNK]
        x = np.ascontiguousarray(keys[rows], np.float32)
        index.add_with_ids(x, ids[rows])
    ivf = faiss.extract_index_ivf(index)
    with replacing(path) as tmp:
        writer = faiss.FileIOWriter(str(tmp))
        faiss.write_InvertedLists(ivf.invlists, writer)
        del writer  # closes the file before it is renamed
    return int(index.ntotal)


def shard_keys_from_archive(root, shard_id: str, fragment: ArchiveFragment | None,
                            tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The shard's keys [len(positions), d] from its archive fragment under ``root``, checked
    to be this shard's rows in position order, with the right next tokens."""
    if fragment is None:
        raise StoreFormatError(f"shard {shard_id} has no key archive (it was built with "
                               "--no-archive): its lists cannot be filled again without "
                               "encoding its documents with the model")
    rows = fragment_rows(root, fragment.file.path)
    where = f"archive fragment {fragment.file.path} of shard {shard_id}"
    if rows.num_rows != len(positions):
        raise StoreFormatError(f"{where}: {rows.num_rows} rows for {len(positions)} keys")
    if len(positions) and (
            not pc.all(pc.equal(rows.column("shard"), shard_id)).as_py()
            or not np.array_equal(rows.column("position").to_numpy(), positions)
            or not np.array_equal(rows.column("next_token").to_numpy(), tokens[positions + 1])):
        raise StoreFormatError(f"{where}: its rows are not this shard's keys in position order")
    return keys_of(rows)


def fill_shard_index(root, shard_id: str, quantizer: bytes, vocab_size: int,
                     fragment: ArchiveFragment | None, lists_name: str = INDEX_FILE,
                     counts: bool = True) -> int:
    """Write the shard's inverted lists ``lists_name`` from the keys of its archive fragment,
    and (with ``counts``) its counts.npy. Returns the number of keys added."""
    tokens = read_tokens(root, shard_id)
    docs = read_docs(root, shard_id)
    check_vocab(vocab_size)
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise StoreFormatError(f"shard {shard_id}: token ids outside the vocabulary of "
                               f"{vocab_size}")
    positions = key_positions(docs.column("start").to_numpy(), docs.column("length").to_numpy(),
                              len(tokens))
    keys = shard_keys_from_archive(root, shard_id, fragment, tokens, positions)
    index = index_from_bytes(quantizer)
    path = shard_path(root, shard_id, lists_name)
    added = fill_lists(index, keys, tokens, positions, path)
    lists = ListsFile(path, faiss.extract_index_ivf(index).nlist, code_size(index))
    if lists.header.num_entries != len(positions):
        raise StoreFormatError(f"{path}: {lists.header.num_entries} entries written for "
                               f"{len(positions)} keys")
    lists.check_ids(len(tokens), vocab_size)
    if counts:
        write_counts(root, shard_id, np.bincount(tokens[positions + 1], minlength=vocab_size))
    return added


def shard_files(shard: WrittenShard, names=(TOKENS_FILE, DOCS_FILE)) -> list[str]:
    """Store-relative paths of a shard's files and archive fragment (what a step on a remote
    store fetches)."""
    files = [f"{shard_relpath(shard.shard_id)}/{n}" for n in names]
    return files + ([shard.archive.file.path] if shard.archive else [])


def sample_keys(store: str, shards: list[WrittenShard], size: int, seed: int) -> np.ndarray:
    """About ``size`` keys drawn uniformly from the shards' archive fragments (float32
    [n, d]); only the drawn rows are read."""
    shards = sorted(shards, key=lambda s: s.shard_id)  # the same draw on every runner
    total = sum(s.num_keys for s in shards)
    rng = np.random.default_rng(seed)
    wants = [min(s.num_keys, int(round(size * s.num_keys / max(total, 1)))) for s in shards]
    # One float32 array, filled shard by shard: concatenating per-shard parts held the sample
    # twice at its peak (at 100M tokens, 1.56M keys: 400 MB more on the training worker).
    out: np.ndarray | None = None
    filled = 0
    for s, want in zip(shards, wants):
        if want == 0:
            continue
        if s.archive is None:
            raise StoreFormatError(f"shard {s.shard_id} has no key archive to sample from")
        with staged(store, [s.archive.file.path]) as root:
            rows = np.sort(rng.choice(s.num_keys, want, replace=False))
            part = keys_of(fragment_rows(root, s.archive.file.path, rows))
        if out is None:
            out = np.empty((sum(wants), part.shape[1]), np.float32)
        out[filled:filled + len(part)] = part
        filled += len(part)
    return out[:filled] if out is not None else np.zeros((0, 0), np.float32)


def reindexed_lists_name(quantizer_sha256: str) -> str:
    """The inverted lists a re-index writes into an existing shard: named by the quantizer, so
    they never replace the lists an older generation names."""
    return f"ivf-{quantizer_sha256[:16]}.lists"


class FillShardIndexFn(beam.DoFn):
    def __init__(self, store: str, generation: int, vocab_size: int, keep_archive: bool = True,
                 reindex: bool = False):
        self.store = store
        self.generation = generation
        self.vocab_size = vocab_size
        self.keep_archive = keep_archive
        self.reindex = reindex  # an existing shard: new lists beside its own, counts kept

    def process(self, shard: WrittenShard, fitted):
        # A remote store: the tokens, documents and archive fragment come down, the lists and
        # counts go up; checksums are taken locally.
        lists_name = (reindexed_lists_name(fitted.index_spec.quantizer.sha256) if self.reindex
                      else INDEX_FILE)
        fetch = shard_files(shard, (TOKENS_FILE, DOCS_FILE, COUNTS_FILE) if self.reindex
                            else (TOKENS_FILE, DOCS_FILE))
        with stage_clock("fill"), staged(self.store, fetch) as root:
            added = fill_shard_index(root, shard.shard_id, fitted.quantizer, self.vocab_size,
                                     shard.archive, lists_name, counts=not self.reindex)
            if added != shard.num_keys:
                raise RuntimeError(f"shard {shard.shard_id}: index holds {added} keys, "
                                   f"the shard {shard.num_keys}")
            info = shard_info(root, shard.shard_id, shard.num_docs, shard.num_tokens,
                              shard.num_keys, self.generation,
                              shard.archive if self.keep_archive else None, lists_name)
        if not self.keep_archive and shard.archive:
            store_io(self.store).remove(shard.archive.file.path)  # never committed: not read
        release_free_heap()  # the keys and codes of the next shard differ in size
        yield FilledShard(info, fitted.index_spec.quantizer.sha256)


class FillShardIndex(beam.PTransform):
    """WrittenShards -> FilledShards, after writing each shard's inverted lists and counts from
    its archive fragment (dropped afterwards unless ``keep_archive``)."""

    def __init__(self, store: str, generation: int, fitted, vocab_size: int,
                 keep_archive: bool = True, reindex: bool = False):
        super().__init__()
        self.store = store_io(store)
        self.generation = generation
        self.fitted = fitted  # singleton PCollection of FittedKeys, quantizer trained
        self.vocab_size = vocab_size
        self.keep_archive = keep_archive
        self.reindex = reindex

    def expand(self, shards):
        return shards | "FillIndex" >> beam.ParDo(
            FillShardIndexFn(self.store, self.generation, self.vocab_size, self.keep_archive,
                             self.reindex),
            beam.pvalue.AsSingleton(self.fitted))
