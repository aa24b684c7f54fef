"""A shard's index entries: packed ids and the inverted-list file ``ivf.lists``.

Every key of a shard is one entry of its faiss inverted lists: a compressed code plus an int64
id, and the id does all the bookkeeping::

    id = (next_token << TOKEN_SHIFT) | position

``position`` is the key's offset in the shard's token stream (the value is read from there) and
``next_token`` is ``tokens[position + 1]``, the token the model predicts from the key's hidden
state. So no position array and no next-token array is stored, and the first-token filter is an
id range, ``[y << TOKEN_SHIFT, (y + 1) << TOKEN_SHIFT)``, that faiss applies inside the search.
The builder writes each list in ascending id order, so faiss finds a token's entries in a list
by binary search (``IDSelectorRange(..., assume_sorted=True)``) and scans only those.

``ivf.lists`` is faiss's own serialization of ``ArrayInvertedLists`` (``write_InvertedLists``)::

    b"ilar" | nlist u64 | code_size u64 | b"full" | nlist u64 | nlist x u64 sizes
                                           (or b"sprs" | 2k u64 | k (list, size) u64 pairs)
    then for each non-empty list in order: size x code_size code bytes, size x int64 ids

which faiss memory-maps (``read_InvertedLists(..., IO_FLAG_MMAP)``, an ``OnDiskInvertedLists``
with its background prefetch threads turned off): faiss keeps the list sizes in memory and reads
codes and ids from the mapping, only in the thread that searches. ``read_lists_header`` checks the header (a
zeroed or overwritten one has no ``ilar`` magic) and that the file is exactly as long as the
sizes say before faiss sees it (a truncated mapped file would crash the process with SIGBUS
instead of raising); ``Store.check`` runs it again on a loaded store. A file whose header is
intact but whose codes and ids were overwritten (zeros) passes both: its ids all read as 0, so a
search finds none of the shard's keys and returns nothing from it, silently. Only its checksum
(``dresd verify``, ``load_store(verify="full")``) catches that; the file must never be written
in place (schemas/FORMAT.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from schemas.atomic import replacing
from schemas.errors import StoreFormatError

TOKEN_SHIFT = 40  # low 40 bits: position in the shard's token stream
MAX_POSITION = 1 << TOKEN_SHIFT  # a shard holds fewer tokens than this (~1.1e12)
MAX_VOCAB = 1 << (63 - TOKEN_SHIFT)  # 8,388,608 token ids; ids stay non-negative int64
POSITION_MASK = MAX_POSITION - 1

_MAGIC = b"ilar"


def check_vocab(vocab_size: int) -> None:
    if not 0 < vocab_size <= MAX_VOCAB:
        raise StoreFormatError(f"vocabulary of {vocab_size} tokens does not fit the index ids "
                               f"(at most {MAX_VOCAB} token ids: {63 - TOKEN_SHIFT} bits)")


def pack_ids(next_tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """int64 ids of keys at ``positions`` whose next tokens are ``next_tokens``."""
    t = np.asarray(next_tokens, np.int64)
    p = np.asarray(positions, np.int64)
    if t.size and (t.min() < 0 or t.max() >= MAX_VOCAB):
        raise StoreFormatError(f"token ids must lie in [0, {MAX_VOCAB}) to be packed into "
                               f"index ids (got {t.min()}..{t.max()})")
    if p.size and (p.min() < 0 or p.max() >= MAX_POSITION):
        raise StoreFormatError(f"positions must lie in [0, 2**{TOKEN_SHIFT}) to be packed into "
                               f"index ids (got {p.min()}..{p.max()}); split the shard")
    return (t << TOKEN_SHIFT) | p


def unpack_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(next_tokens, positions) of packed ids."""
    ids = np.asarray(ids, np.int64)
    return ids >> TOKEN_SHIFT, ids & POSITION_MASK


def token_id_range(token: int) -> tuple[int, int]:
    """The id range [lo, hi) of keys followed by ``token``."""
    return token << TOKEN_SHIFT, (token + 1) << TOKEN_SHIFT


@dataclass(frozen=True)
class ListsHeader:
    nlist: int
    code_size: int
    sizes: np.ndarray  # int64 [nlist]
    data_offset: int  # where the first non-empty list's codes start

    @property
    def num_entries(self) -> int:
        return int(self.sizes.sum())

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.num_entries * (self.code_size + 8)

    def offsets(self) -> np.ndarray:
        """Byte offset of each list's codes (its ids follow them)."""
        per = self.sizes * (self.code_size + 8)
        return self.data_offset + np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64)


def read_lists_header(path: str | os.PathLike, nlist: int | None = None,
                      code_size: int | None = None, num_entries: int | None = None,
                      file: BinaryIO | None = None) -> ListsHeader:
    """Parse and check the header of an ``ivf.lists`` file (reads only the header): the magic,
    ``nlist`` and ``code_size`` when given, the entry count when ``num_entries`` is given, and
    that the file's length is what the list sizes say. ``file``: the file already open (read
    from its start, its length taken from the open file, not the path); ``path`` then only
    names it in errors."""
    path = Path(path)
    with contextlib.ExitStack() as stack:
        f = file if file is not None else stack.enter_context(open(path, "rb"))
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        header = _parse_header(f, path, size, nlist, code_size)
    if num_entries is not None and header.num_entries != num_entries:
        raise StoreFormatError(f"{path} holds {header.num_entries} entries, the manifest says "
                               f"{num_entries} keys")
    return header


def _parse_header(f: BinaryIO, path: Path, size: int, nlist: int | None,
                  code_size: int | None) -> ListsHeader:
    head = f.read(24)
    if len(head) < 24 or head[:4] != _MAGIC:
        raise StoreFormatError(
            f"{path} is not an inverted-list file (bad header: magic {head[:4]!r}, not "
            f"{_MAGIC!r}; zeroed or overwritten in place?)")
    n, cs = (int(v) for v in np.frombuffer(head[4:20], np.uint64))
    kind = head[20:24]
    if not 0 < n < 1 << 31 or not 0 < cs < 1 << 16:
        raise StoreFormatError(f"{path}: implausible header (nlist {n}, code size {cs})")
    if nlist is not None and n != nlist:
        raise StoreFormatError(f"{path} has {n} lists, the store's quantizer {nlist}")
    if code_size is not None and cs != code_size:
        raise StoreFormatError(f"{path} has codes of {cs} bytes, the quantizer {code_size}")
    if kind == b"full":
        raw = f.read(8 * (n + 1))
        if len(raw) != 8 * (n + 1) or int(np.frombuffer(raw[:8], np.uint64)[0]) != n:
            raise StoreFormatError(f"{path} is truncated or has a bad list table")
        sizes = np.frombuffer(raw[8:], np.uint64).astype(np.int64)
        offset = 32 + 8 * n
    elif kind == b"sprs":
        raw = f.read(8)
        count = int(np.frombuffer(raw, np.uint64)[0]) if len(raw) == 8 else -1
        if count < 0 or count % 2 or count > 2 * n:
            raise StoreFormatError(f"{path}: bad sparse list table")
        raw = f.read(8 * count)
        if len(raw) != 8 * count:
            raise StoreFormatError(f"{path} is truncated (list sizes)")
        pairs = np.frombuffer(raw, np.uint64).astype(np.int64).reshape(-1, 2)
        if pairs.size and (pairs[:, 0].max() >= n or pairs.min() < 0):
            raise StoreFormatError(f"{path}: list numbers outside 0..{n - 1}")
        sizes = np.zeros(n, np.int64)
        sizes[pairs[:, 0]] = pairs[:, 1]
        offset = 32 + 8 * count
    else:
        raise StoreFormatError(f"{path}: unknown list table {kind!r}")
    if sizes.size and (sizes.min() < 0 or sizes.max() > size):
        raise StoreFormatError(f"{path}: implausible list sizes")
    header = ListsHeader(n, cs, sizes, offset)
    if header.file_bytes != size:
        raise StoreFormatError(f"{path} holds {size} bytes, its header says {header.file_bytes} "
                               "(truncated or padded)")
    return header


class ListsFile:
    """Read access to an ``ivf.lists`` file without faiss (compaction, checks)."""

    def __init__(self, path: str | os.PathLike, nlist: int | None = None,
                 code_size: int | None = None):
        self.path = Path(path)
        self.header = read_lists_header(path, nlist, code_size)
        self._offsets = self.header.offsets()
        self._data = np.memmap(self.path, np.uint8, "r") if self.header.num_entries else None

    def list(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 [n, code_size], ids int64 [n]) of list ``i``, memory-mapped."""
        n, cs = int(self.header.sizes[i]), self.header.code_size
        if n == 0:
            return np.zeros((0, cs), np.uint8), np.zeros(0, np.int64)
        o = int(self._offsets[i])
        codes = self._data[o : o + n * cs].reshape(n, cs)
        ids = self._data[o + n * cs : o + n * (cs + 8)].view(np.int64)
        return codes, ids

    def check_ids(self, num_tokens: int, vocab_size: int | None = None) -> None:
        """Every id in range and every list in ascending id order (reads every id)."""
        for i in np.flatnonzero(self.header.sizes):
            _, ids = self.list(int(i))
            tok, pos = unpack_ids(ids)
            if ids.min() < 0 or pos.max() + 1 >= max(num_tokens, 1) or (
                    vocab_size is not None and tok.max() >= vocab_size):
                raise StoreFormatError(f"{self.path}: list {i} holds ids outside the shard "
                                       f"({num_tokens} tokens) or the vocabulary")
            if len(ids) > 1 and not (np.diff(ids) > 0).all():
                raise StoreFormatError(f"{self.path}: list {i} is not in ascending id order")


def write_lists(path: str | os.PathLike, nlist: int, code_size: int, sizes: np.ndarray,
                lists: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """Stream an ``ivf.lists`` file: ``lists`` yields (codes, ids) for every list in order,
    with the lengths given in ``sizes``. Written to a temporary name, then renamed."""
    sizes = np.asarray(sizes, np.int64)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(_MAGIC + np.array([nlist, code_size], np.uint64).tobytes() + b"full")
        f.write(np.uint64(nlist).tobytes() + sizes.astype(np.uint64).tobytes())
        seen = 0
        for i, (codes, ids) in enumerate(lists):
            if len(ids) != sizes[i] or codes.shape != (sizes[i], code_size):
                raise ValueError(f"list {i}: {len(ids)} entries, header says {sizes[i]}")
            if len(ids):
                f.write(np.ascontiguousarray(codes, np.uint8).tobytes())
                f.write(np.ascontiguousarray(ids, np.int64).tobytes())
            seen += 1
        if seen != nlist:
            raise ValueError(f"{seen} lists written, header says {nlist}")


def open_mmap_lists(path: str | os.PathLike, nlist: int, code_size: int, num_entries: int):
    """The shard's inverted lists as a faiss ``InvertedLists``, memory-mapped read-only, after
    the header checks above."""
    import faiss

    read_lists_header(path, nlist, code_size, num_entries)
    reader = faiss.FileIOReader(str(path))
    try:
        lists = faiss.read_InvertedLists(reader, faiss.IO_FLAG_MMAP)
    finally:
        del reader
    lists = faiss.downcast_InvertedLists(lists)
    # faiss maps the file as an OnDiskInvertedLists, whose IndexIVF.search first starts up to
    # 32 threads that read the probed lists' pages in the background and outlive the call. No
    # thread may read the mapping behind the caller's back: a page lost to a truncated file
    # would then kill the process at a random moment, even after a Store.check() that passed.
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = 0
    return lists
