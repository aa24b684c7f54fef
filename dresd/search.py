"""Nearest keys whose next token is ``y``: the filter works inside the search.

At load time the keys are sorted by next token, so each token's keys form one contiguous range
of "sorted ids", and every faiss IVF index is rewritten to use sorted ids. A query for token y
then searches only y's range:

- small groups (at most ``exact_threshold`` keys): exact inner product over the slice, so the
  result has min(k, group size) keys by construction;
- large groups: the IVF index with an ``IDSelectorRange`` over the group, reranked exactly;
  when fewer than k come back, nprobe widens, and at the end an exact scan of the group runs.

Either way a query returns k keys whenever the store holds k keys followed by y.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import faiss
import numpy as np
import torch


@contextmanager
def _single_threaded():
    """faiss on one OpenMP thread for the duration of a search, then back.

    Decoding sends one query at a time, which gains nothing from threads, while idle faiss
    threads next to torch's starve the model (a tiny model's verify step took 150 ms instead of
    1 ms). The setting is not left at 1: faiss and torch share one OpenMP runtime here, so
    ``faiss.omp_set_num_threads(1)`` also puts torch on one thread, which halved the speed of
    every forward pass on a 2-core machine until it was scoped to the search.
    """
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


class KeySearch:
    def __init__(
        self,
        vectors: np.ndarray,
        next_token: np.ndarray,
        ivf_parts: Sequence[tuple[faiss.Index, int]] = (),
        nprobe: int = 16,
        exact_threshold: int = 4096,
    ):
        """``vectors`` [K, d] and ``next_token`` [K] in global key order; ``ivf_parts`` are
        filled IVF indexes whose ids are rows of a block of keys starting at the given global
        offset (one per shard). The parts are merged into one index with sorted ids."""
        next_token = np.asarray(next_token)
        if len(vectors) != len(next_token):
            raise ValueError(f"{len(vectors)} vectors but {len(next_token)} next tokens")
        if len(next_token) and next_token.min() < 0:
            raise ValueError("negative next-token ids in the keys")
        self.num_keys = len(next_token)
        self.dim = vectors.shape[1] if vectors.ndim == 2 else 0
        self.order = np.argsort(next_token, kind="stable")  # sorted id -> global key id
        # float32 so the exact scans run on BLAS; the float16 originals are not kept.
        self.vectors = np.ascontiguousarray(np.asarray(vectors)[self.order], dtype=np.float32)
        self._vectors = torch.from_numpy(self.vectors)  # the same memory, for _scores
        counts = np.bincount(next_token, minlength=1) if len(next_token) else np.zeros(1, int)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.nprobe = nprobe
        self.exact_threshold = exact_threshold
        self.index = self._merge(ivf_parts) if ivf_parts else None
        self.fallbacks = 0  # IVF searches that ended in an exact scan of the group

    def _merge(self, parts: Sequence[tuple[faiss.Index, int]]) -> faiss.Index:
        rank = np.empty(self.num_keys, np.int64)
        rank[self.order] = np.arange(self.num_keys)
        merged = None
        total = 0
        for index, offset in parts:
            ivf = faiss.extract_index_ivf(index)
            inv = ivf.invlists
            for lst in range(ivf.nlist):
                n = inv.list_size(lst)
                if n:
                    ids = faiss.rev_swig_ptr(inv.get_ids(lst), n)
                    if ids.min() < 0 or offset + ids.max() >= self.num_keys:
                        raise ValueError(f"IVF index at key offset {offset} has ids outside "
                                         "its block of keys")
                    ids[:] = rank[offset + ids]  # in place: the index is ours to rewrite
            total += index.ntotal
            if merged is None:
                merged = index
            else:
                merged.merge_from(index, 0)
        if total != self.num_keys:
            raise ValueError(f"the IVF indexes hold {total} keys, the key tables {self.num_keys}")
        self.nlist = faiss.extract_index_ivf(merged).nlist
        return merged

    def group(self, token: int) -> tuple[int, int]:
        """The sorted-id range [lo, hi) of keys followed by ``token``."""
        if token < 0 or token + 1 >= len(self.offsets):
            return 0, 0
        return int(self.offsets[token]), int(self.offsets[token + 1])

    def group_size(self, token: int) -> int:
        lo, hi = self.group(token)
        return hi - lo

    def search(self, query: np.ndarray, token: int, k: int,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Global key ids and inner-product scores of the best k keys followed by ``token``,
        best first."""
        lo, hi = self.group(token)
        if hi - lo == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        query = np.asarray(query, np.float32).reshape(-1)
        want = min(k, hi - lo)
        if self.index is None or hi - lo <= self.exact_threshold:
            pos, scores = self._exact(query, lo, hi, want)
        else:
            pos, scores = self._ivf(query, lo, hi, want, nprobe or self.nprobe)
        return self.order[pos], scores

    def _scores(self, rows, query: np.ndarray) -> np.ndarray:
        # On torch's thread pool, not numpy's BLAS: OpenBLAS threads left spinning after a
        # matrix-vector product slowed the model's next forward tenfold on a 2-core machine.
        return torch.mv(self._vectors[rows], torch.from_numpy(query)).numpy()

    def _exact(self, query, lo, hi, k):
        scores = self._scores(slice(lo, hi), query)
        if k < len(scores):
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return top + lo, scores[top]

    def _ivf(self, query, lo, hi, k, nprobe):
        with _single_threaded():
            return self._ivf_search(query, lo, hi, k, nprobe)

    def _ivf_search(self, query, lo, hi, k, nprobe):
        sel = faiss.IDSelectorRange(lo, hi)
        q = query[None]
        # Two tries, the second probing 4x the lists, then an exact scan of the group (cheaper
        # than probing every list of a large index).
        for probes in (nprobe, 4 * nprobe):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(probes, self.nlist))
            _, ids = self.index.search(q, k, params=params)
            ids = ids[0][ids[0] >= 0]
            if len(ids) >= k:
                # Rerank exactly: the index may be quantized (IVF-PQ).
                scores = self._scores(torch.from_numpy(ids), query)
                best = np.argsort(-scores, kind="stable")
                return ids[best], scores[best]
            if probes >= self.nlist:
                break
        self.fallbacks += 1
        return self._exact(query, lo, hi, k)
