"""Sparse retrieval baselines over the same corpus as a dense store.

``RestDrafter`` is REST (He et al., 2023): find the longest suffix of the context (it ends in
``y``) that occurs in the corpus, trying lengths from ``max_suffix`` (16) down to ``min_suffix``
(2) and skipping a suffix whose every occurrence ends a document, collect what followed up to
``k`` of its occurrences (evenly spaced over the suffix-array range when there are more; REST
takes the first ``k``), count every prefix of those continuations (at most ``draft_len`` tokens,
never past a document's end), keep the ``choices`` most frequent prefixes (a trie, since a prefix
is at least as frequent as its extensions; built as a ``DraftTree``) and draft the trie's leaves,
scored by the fraction of occurrences that continue with them.

Why not the ``draftretriever`` package for REST itself: the only release on PyPI (0.1.1) is
ADED's fork, not REST's suffix array. As probed here: its index file is a trigram table (token
pair -> next-token weights), ``search`` looks at the last two query tokens only, expands at most
4 tokens deep, ignores ``k`` and ``long``, returns the trie in hash order without counts, and
aborts the whole process (a Rust panic, no exception) on a query shorter than 2 tokens or
``choices < 2``. So REST's longest-suffix search is implemented here on a suffix array (numpy),
and the package is a baseline of the decode benchmark only (benchmarks/draftretriever.py,
ADED-style trigram drafts, with those inputs guarded), built with this module's helpers.

REST builds its index over exactly a store's documents (``from_store``): the token streams are
split at document boundaries, so no match or continuation crosses from one document into the
next. Indexes are cached under ``$DRESD_CACHE/rest`` (default ``~/.cache/dresd/rest``), keyed by
the checksums of the store's token streams and document tables.

Suffix array index (a directory): ``tokens.npy``, every document's tokens with -1 before, between
and after them; ``ends.npy``, the positions of all real tokens sorted by the string read
*backwards* from them (the first ``depth`` tokens; ties by position), so the occurrences of a
context suffix are one contiguous range that narrows as the suffix grows by one token to the
left; ``offsets.npy``, where each token's range starts; ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.tree import DraftTree

log = logging.getLogger(__name__)

SEP = -1
INDEX_VERSION = 1


def store_docs(store) -> Iterator[np.ndarray]:
    """Every document of ``store`` (a dresd Store), in shard order, as an int32 token array."""
    for shard in store.shards:
        for s, e in zip(shard.doc_starts.tolist(), shard.doc_ends.tolist()):
            yield np.asarray(shard.tokens[s:e], dtype=np.int32)


def store_corpus_key(store, kind: str) -> str:
    """A digest of the store's token streams and document tables (their manifest checksums)."""
    h = hashlib.sha256(f"{kind}-v{INDEX_VERSION}".encode())
    for info in store.manifest.shards:
        h.update(f"{info.tokens.sha256}:{info.docs.sha256};".encode())
    return h.hexdigest()[:24]


def cached_index(store, kind: str, suffix: str, cache_dir: str | os.PathLike | None,
                  build: Callable[[Iterable[np.ndarray], Path, int], Path]) -> Path:
    """The index of ``store``'s documents under the cache, built on first use."""
    if cache_dir is None:
        from dresd.models import cache_dir as default_cache

        cache_dir = default_cache() / "rest"
    path = Path(cache_dir) / f"{store_corpus_key(store, kind)}{suffix}"
    if not path.exists():
        t0 = time.perf_counter()
        build(store_docs(store), path, int(store.manifest.model.vocab_size))
        log.info("built the %s index of %s (%d tokens) in %.1fs: %s", kind, store.path,
                 store.manifest.num_tokens, time.perf_counter() - t0, path)
    return path


def check_tokens(doc: np.ndarray, vocab_size: int) -> None:
    if doc.size and (int(doc.min()) < 0 or int(doc.max()) >= vocab_size):
        raise ValueError(f"token ids outside the vocabulary of size {vocab_size}: "
                         f"range {int(doc.min())}..{int(doc.max())}")


# --------------------------------------------------------------------------- suffix array (REST)


def build_rest_index(docs: Iterable[Sequence[int]], path: str | os.PathLike, vocab_size: int,
                     depth: int = 32) -> Path:
    """Write the REST suffix-array index of ``docs`` to the directory ``path`` (replaced
    atomically if it exists) and return it. Suffixes are sorted on their first ``depth``
    tokens (rounded up to a power of two), which bounds the longest usable match."""
    t0 = time.perf_counter()
    parts = [np.array([SEP], np.int32)]
    num_docs = 0
    for doc in docs:
        arr = np.asarray(doc, dtype=np.int64)
        check_tokens(arr, vocab_size)
        parts += [arr.astype(np.int32), parts[0]]
        num_docs += 1
    toks = np.concatenate(parts)
    n = len(toks)
    # Rank of the string of h tokens read backwards from each position; doubled until h >= depth.
    rank = toks.astype(np.int64) + 1  # the separator ranks lowest
    h = 1
    while h < depth:
        prev = np.zeros(n, np.int64)
        prev[h:] = rank[:-h]  # the next h tokens further left
        _, rank = np.unique(rank * (n + 1) + prev, return_inverse=True)
        rank = rank.reshape(-1).astype(np.int64)
        h *= 2
        log.debug("rest index: sorted on %d tokens (%.1fs)", h, time.perf_counter() - t0)
    real = np.flatnonzero(toks >= 0)
    ends = real[np.argsort(rank[real], kind="stable")]
    first = toks[ends]
    offsets = np.searchsorted(first, np.arange(vocab_size + 1)).astype(np.int64)
    idx_dtype = np.int32 if n < 2**31 else np.int64
    meta = {"format": "dresd-rest", "version": INDEX_VERSION, "depth": h, "num_docs": num_docs,
            "num_tokens": int(len(real)), "vocab_size": int(vocab_size)}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent))
    try:
        np.save(tmp / "tokens.npy", toks)
        np.save(tmp / "ends.npy", ends.astype(idx_dtype))
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("rest index: %d docs, %d tokens in %.2fs -> %s", num_docs, meta["num_tokens"],
             time.perf_counter() - t0, path)
    return path


class RestIndex:
    """A loaded suffix-array index (memory-mapped)."""

    gather_below = 64  # narrow ranges smaller than this by gathering them (else bisect)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no REST index at {self.path}")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != "dresd-rest" or self.meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{self.path} is not a REST index of version {INDEX_VERSION}")
        self.depth = int(self.meta["depth"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        self.ends = np.load(self.path / "ends.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")

    def suffix_ranges(self, context: Sequence[int], max_len: int) -> list[tuple[int, int]]:
        """``ranges[L - 1]`` = the range of ``ends`` whose backward strings start with the last
        L context tokens, for every L up to the longest that occurs (at most ``max_len``)."""
        max_len = min(max_len, self.depth, len(context))
        if max_len < 1:
            return []
        t = int(context[-1])
        if not 0 <= t < self.vocab_size:
            return []
        lo, hi = int(self.offsets[t]), int(self.offsets[t + 1])
        if lo == hi:
            return []
        ranges = [(lo, hi)]
        toks, ends = self.tokens, self.ends
        for j in range(1, max_len):
            tok = int(context[-1 - j])
            if hi - lo < self.gather_below:  # gather the column, search it in numpy
                col = toks[ends[lo:hi].astype(np.int64) - j]
                a = lo + int(np.searchsorted(col, tok, "left"))
                b = lo + int(np.searchsorted(col, tok, "right"))
            else:
                a = _bisect(toks, ends, j, tok, lo, hi, right=False)
                b = _bisect(toks, ends, j, tok, a, hi, right=True)
            if a == b:
                break
            lo, hi = a, b
            ranges.append((lo, hi))
        return ranges

    def continuations(self, ends: np.ndarray, length: int) -> np.ndarray:
        """[m, length] tokens after each end position, -1 past its document's end."""
        idx = np.minimum(ends.astype(np.int64)[:, None] + 1 + np.arange(length),
                         len(self.tokens) - 1)
        cont = np.asarray(self.tokens[idx], dtype=np.int64)
        cont[np.cumsum(cont < 0, axis=1) > 0] = SEP
        return cont


def _bisect(toks, ends, j: int, tok: int, lo: int, hi: int, right: bool) -> int:
    """First i in [lo, hi) whose backward token j is >= tok (> tok when ``right``)."""
    while lo < hi:
        mid = (lo + hi) // 2
        v = int(toks[int(ends[mid]) - j])
        if v < tok or (right and v == tok):
            lo = mid + 1
        else:
            hi = mid
    return lo


def continuation_trie(cont: np.ndarray, choices: int) -> list[tuple[tuple[int, ...], int]]:
    """Leaves of the trie of the ``choices`` most frequent prefixes of the rows of ``cont``
    (-1 ends a row), as (tokens, count), most frequent first (ties: deeper, then tokens).

    Counting: with the rows sorted lexicographically, the rows that share a prefix are one
    contiguous run, so a prefix of d tokens starts at each row that differs from the row
    before within its first d tokens, and its count is the length of its run. The chosen
    prefixes, in the order (count descending, length, tokens), go into a ``DraftTree``: a
    prefix is never rarer than its extensions and is shorter, so every prefix's parent is in
    the tree before it, and the tree's leaves are the drafts."""
    m, length = cont.shape
    cont = np.where(np.cumsum(cont < 0, axis=1) > 0, SEP, cont)
    if not m or cont[:, 0].max() < 0:
        return []
    rows = cont[np.lexsort(cont.T[::-1])]
    differs = rows[1:] != rows[:-1]
    first_diff = np.concatenate(([-1], np.where(differs.any(1), differs.argmax(1), length)))
    starts, depths, counts = [], [], []
    for d in range(1, length + 1):
        run = np.flatnonzero(first_diff < d)  # first rows of the runs of equal d-token prefixes
        real = rows[run, d - 1] >= 0
        if not real.any():
            break
        starts.append(run[real])
        depths.append(np.full(int(real.sum()), d))
        counts.append(np.diff(run, append=m)[real])
    # Among prefixes of one length, the sorted rows' order is the tokens' order, so this key
    # orders by (count descending, length, tokens) and is unique per prefix.
    key = ((m - np.concatenate(counts)) * (length + 1) + np.concatenate(depths)) * m \
        + np.concatenate(starts)
    if len(key) > choices:
        key = key[np.argpartition(key, choices - 1)[:choices]]
    key = np.sort(key)
    start, depth, count = key % m, key // m % (length + 1), m - key // m // (length + 1)
    tree, node_count = DraftTree(SEP), [m]
    for toks, d, c in zip(rows[start].tolist(), depth.tolist(), count.tolist()):
        tree.add(toks[:d])
        node_count.append(c)
    paths = tree.token_paths()
    leaves = [(paths[i], node_count[i]) for i in range(1, len(tree)) if not tree.children(i)]
    leaves.sort(key=lambda x: (-x[1], -len(x[0]), x[0]))
    return leaves


class RestDrafter(Drafter):
    """REST: continuations of the longest context suffix found in the corpus."""

    name = "rest"

    def __init__(self, index_path: str | os.PathLike, max_suffix: int = 16, min_suffix: int = 2,
                 k: int = 5000, choices: int = 64):
        if not 1 <= min_suffix <= max_suffix:
            raise ValueError(f"need 1 <= min_suffix <= max_suffix, got {min_suffix}, {max_suffix}")
        if k < 1 or choices < 1:
            raise ValueError("k and choices must be >= 1")
        self.index = RestIndex(index_path)
        if max_suffix > self.index.depth:
            raise ValueError(f"max_suffix {max_suffix} exceeds the index's sort depth "
                             f"{self.index.depth}; rebuild it with a larger depth")
        self.max_suffix = max_suffix
        self.min_suffix = min_suffix
        self.k = k
        self.choices = choices
        self.last_match_len = 0  # suffix length the last propose matched (0: none)

    @classmethod
    def from_store(cls, store, cache_dir: str | os.PathLike | None = None, **kwargs) -> RestDrafter:
        """REST over exactly ``store``'s documents (index built once, then cached)."""
        return cls(cached_index(store, "rest", ".rest", cache_dir, build_rest_index), **kwargs)

    @classmethod
    def from_config(cls, store, config) -> RestDrafter:
        """REST's own defaults: ``config.k`` counts dense neighbours, not suffix occurrences."""
        return cls.from_store(store)

    def propose(self, request: DraftRequest) -> list[Draft]:
        self.last_match_len = 0
        if request.num_drafts < 1 or request.draft_len < 1:
            return []
        ranges = self.index.suffix_ranges(request.tokens, self.max_suffix)
        for length in range(len(ranges), self.min_suffix - 1, -1):
            lo, hi = ranges[length - 1]
            pick = np.arange(lo, hi) if hi - lo <= self.k else lo + (
                np.arange(self.k, dtype=np.int64) * (hi - lo)) // self.k
            cont = self.index.continuations(np.asarray(self.index.ends[pick]), request.draft_len)
            cont = cont[cont[:, 0] >= 0]  # occurrences at a document's end have no continuation
            if not len(cont):
                continue
            self.last_match_len = length
            leaves = continuation_trie(cont, self.choices)[: request.num_drafts]
            return [Draft(toks, c / len(cont), self.name) for toks, c in leaves]
        return []
