"""Nearest keys whose next token is ``y``: the filter works inside the search, over every shard.

A store has one trained quantizer (an HNSW graph over the IVF list centroids plus the codec) and,
per shard, inverted lists memory-mapped from ``ivf.lists``. The ids in the lists are
``(next_token << 40) | position`` (schemas.lists), written in ascending order in every list, so:

- the first-token filter is the id range of ``y``: faiss's ``IDSelectorRange`` with
  ``assume_sorted`` finds ``y``'s entries in each probed list by binary search and scores only
  those (no per-token index, no load-time sort);
- a hit's id is its value's position in the shard's token stream (no position table).

A query is assigned to its ``nprobe`` nearest lists once; each shard's lists are then scanned
with that assignment (``search_preassigned``) and the per-shard top k merged. Each shard's ``counts.npy``
says how many keys it holds per next token, so shards without ``y`` are skipped. When fewer than
min(k, keys followed by ``y``) turn up, the search is repeated once with 4 x nprobe lists and
whatever it finds is returned: keys followed by ``y`` cluster near the states that predict ``y``, so a wider
probe rarely finds more, and an exhaustive scan would need the float keys the runtime no longer
holds. Scores are the codec's inner products (PQ codes: approximate).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import faiss
import numpy as np

from schemas.lists import token_id_range

WIDEN = 4  # the second try probes this many times more lists


@contextmanager
def _single_threaded():
    """faiss on one OpenMP thread for the duration of a search, then back.

    Decoding sends one query at a time, which gains nothing from threads, while idle faiss
    threads spinning next to torch's starve the model's forward pass. The setting is restored
    afterwards, not left at 1: where faiss and torch share one OpenMP runtime,
    ``faiss.omp_set_num_threads(1)`` also puts torch on one thread, for every forward pass.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def shard_searcher(base: faiss.Index, lists) -> faiss.IndexIVF:
    """An IVF index over one shard's ``lists`` that shares ``base``'s coarse quantizer and
    codec (neither is copied per shard: the quantizer of a 40k-list index is ~20 MB)."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(base))
    d, nlist, metric = ivf.d, ivf.nlist, ivf.metric_type
    if isinstance(ivf, faiss.IndexIVFPQ):
        shell = faiss.IndexIVFPQ(ivf.quantizer, d, nlist, ivf.pq.M, ivf.pq.nbits, metric)
        shell.pq = ivf.pq
        shell.by_residual = ivf.by_residual
    elif isinstance(ivf, faiss.IndexIVFFlat):
        shell = faiss.IndexIVFFlat(ivf.quantizer, d, nlist, metric)
    else:
        raise ValueError(f"unsupported index type {type(ivf).__name__}")
    if shell.code_size != ivf.code_size:
        raise ValueError(f"codec mismatch: {shell.code_size} != {ivf.code_size} bytes")
    shell.is_trained = True
    shell.replace_invlists(lists, False)  # the caller keeps ``lists`` alive
    shell.ntotal = lists.compute_ntotal()
    # faiss's own convention: Python owners of objects an index points to ride along with it
    # (the constructor already put the shared quantizer there).
    shell.referenced_objects.append(lists)
    return shell


class ShardedSearch:
    """Filtered k-NN over the inverted lists of every shard of a store."""

    def __init__(self, base: faiss.Index, shards: Sequence[faiss.IndexIVF],
                 counts: Sequence[np.ndarray], nprobe: int = 16):
        self.base = base
        self.ivf = faiss.extract_index_ivf(base)
        self.quantizer = self.ivf.quantizer
        self.nlist = int(self.ivf.nlist)
        self.dim = int(self.ivf.d)
        self.shards = list(shards)
        self.nprobe = nprobe
        self.counts = list(counts)  # per shard: keys per next token (memory-mapped)
        if len(self.counts) != len(self.shards):
            raise ValueError(f"{len(self.counts)} count arrays for {len(self.shards)} shards")
        self.vocab_size = min((len(c) for c in self.counts), default=0)
        self.num_keys = sum(int(s.ntotal) for s in self.shards)
        hnsw = faiss.downcast_index(self.quantizer)
        if isinstance(hnsw, faiss.IndexHNSW):
            # The quantizer's beam must hold the lists asked for: with efSearch below nprobe the
            # HNSW search returns fewer good lists.
            hnsw.hnsw.efSearch = max(int(hnsw.hnsw.efSearch), WIDEN * nprobe)
        self.widened = 0  # searches that needed the second, wider try

    def group_size(self, token: int) -> int:
        """Keys followed by ``token`` in the whole store."""
        if not 0 <= token < self.vocab_size:
            return 0
        return sum(int(c[token]) for c in self.counts)

    def search(self, query: np.ndarray, token: int, k: int,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard numbers, packed ids, scores) of the best k keys followed by ``token``, best
        first; fewer when the probed lists hold fewer. Only shards that hold keys followed by
        ``token`` are searched (their counts say which), and the wider second try runs only
        when the store holds more such keys than the first one found."""
        empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        if k <= 0 or not 0 <= token < self.vocab_size:
            return empty
        active = [s for s, c in enumerate(self.counts) if c[token] > 0]
        if not active:
            return empty
        want = min(k, sum(int(self.counts[s][token]) for s in active))
        q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        if q.shape[1] != self.dim:
            raise ValueError(f"query of dimension {q.shape[1]}, the store's keys have {self.dim}")
        lo, hi = token_id_range(int(token))
        sel = faiss.IDSelectorRange(lo, hi, True)  # assume_sorted: binary search in each list
        probes = min(max(1, nprobe or self.nprobe), self.nlist)
        with _single_threaded():
            out = self._search(q, sel, k, probes, active)
            if len(out[0]) < want and probes < self.nlist:
                self.widened += 1
                out = self._search(q, sel, k, min(WIDEN * probes, self.nlist), active)
        return out

    def _search(self, q, sel, k, probes, active):
        params = faiss.SearchParametersIVF(sel=sel, nprobe=probes)
        dq, iq = self.quantizer.search(q, probes)
        dist = np.empty((len(active), k), np.float32)
        ids = np.empty((len(active), k), np.int64)
        ptr = faiss.swig_ptr
        xq, aq, cq = ptr(q), ptr(iq), ptr(dq)
        for row, s in enumerate(active):
            self.shards[s].search_preassigned_c(1, xq, k, aq, cq, ptr(dist[row]), ptr(ids[row]),
                                                False, params)
        found = ids >= 0
        shard_no = np.asarray(active, np.int64)[np.nonzero(found)[0]]
        ids, dist = ids[found], dist[found]
        best = np.argsort(-dist, kind="stable")[:k]
        return shard_no[best], ids[best], dist[best]
