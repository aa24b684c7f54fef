"""``load_store``: open a store directory for decoding, in time and memory that do not grow with
its keys.

Loading reads the manifest, the key transform and the index quantizer (the HNSW graph over the
list centroids and the PQ codebooks, tens of MB at most), and memory-maps per shard the token
stream (``tokens.arrow``), the document table (``docs.arrow``), the keys per next token
(``counts.npy``) and the inverted lists (``ivf.lists``, via faiss ``IO_FLAG_MMAP``). Nothing is sorted, merged or rewritten: the builder
wrote every list in the order the search needs (schemas.lists), and the float keys (the archive,
``archive.lance``) are never opened. A value is read from the mapped token stream when a search
returns its key.

What is checked when (``verify``):

- always: the manifest against its schema and format version; every file it names exists inside
  the store with the recorded size (before anything is mapped: a short file is a
  ``StoreFormatError`` naming it, never a SIGBUS), and the Arrow files open as Arrow files; each
  shard's document table covers its token stream exactly and its next-token counts have the
  vocabulary's length and add up to its keys; each ``ivf.lists`` header (magic, so a zeroed one
  is refused) matches the quantizer (lists, code size), the manifest's key count and the file's
  length (so a truncated file is an error, not a crash on a mapped read);
- ``"auto"`` (default) and ``"full"``: the sha256 of the files read whole (transform, quantizer,
  document tables, next-token counts: small), and the model's and tokenizer's fingerprints when given;
- ``"full"`` (or True): also the sha256 of the large mapped files (token streams, inverted
  lists), skipping files ``dresd verify`` recorded as verified and unchanged, and the token
  range of every token stream; successful checksums are recorded;
- on every search hit: the id's token is the one asked for, its position lies inside the shard's
  token stream and is followed there by that token, and every value token lies inside the
  vocabulary; a violation is a ``StoreFormatError`` naming the shard, never a crash.

A large file not yet verified can hold a flipped byte that none of this sees; it can only cost
drafts (every draft is verified by the model, so the output is unchanged). ``dresd verify STORE``
checks every byte, in parallel, and records the result.

A store's files are immutable: nothing dresd does writes one in place (updates and compaction
add shards and generations, ``dresd gc`` removes only files no retained generation names), and
nothing else may (schemas/FORMAT.md, "Files are immutable"). A file truncated under a process
that has it mapped makes that process die with SIGBUS at its next read of the lost pages: the
OS delivers the signal and Python cannot turn it into an exception. ``Store.check()`` re-checks
a loaded store cheaply (sizes, list headers) so that a long-running process can find such damage
as a ``StoreFormatError`` before it reads the pages.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dresd.remote import is_remote, sync_store
from dresd.search import ShardedSearch, shard_searcher
from dresd.transform import KeyTransform
from schemas import Manifest, StoreFormatError, read_manifest, shard_io
from schemas.integrity import Records, check_present, verify_file, verify_files
from schemas.lists import check_vocab, open_mmap_lists, read_lists_header, unpack_ids
from schemas.paths import store_file

log = logging.getLogger(__name__)


class StoreMismatchError(ValueError):
    """The store was built for another model or tokenizer than the one decoding with it."""


@dataclass(frozen=True)
class StoreStats:
    load_s: float
    num_shards: int
    num_docs: int
    num_tokens: int
    num_keys: int
    resident_bytes: int  # held in RAM: quantizer, codec and per-shard list tables (estimate)
    mapped_bytes: int  # token streams, document tables and inverted lists, memory-mapped
    disk_bytes: dict  # bytes on disk by part (Manifest.storage_bytes)
    bytes_per_token: dict  # the same per corpus token
    unverified_bytes: int = 0  # large files not checksummed (by this load or `dresd verify`)

    def summary(self) -> str:
        b = self.bytes_per_token
        parts = ", ".join(f"{k} {b[k]:.1f}" for k in ("values", "index", "docs", "shared"))
        archive = f"; archive {b['archive']:.1f}" if b.get("archive") else ""
        unverified = (f" | {self.unverified_bytes / 2**20:.0f} MiB not yet verified "
                      "(dresd verify)" if self.unverified_bytes else "")
        return (
            f"{self.num_shards} shards, {self.num_docs} docs, {self.num_tokens} tokens, "
            f"{self.num_keys} keys | loaded in {self.load_s:.2f}s | resident "
            f"{self.resident_bytes / 2**20:.1f} MiB + {self.mapped_bytes / 2**20:.1f} MiB mapped "
            f"| bytes/token: serving {b['serving']:.1f} ({parts}){archive}{unverified}"
        )


@dataclass
class _Shard:
    shard_id: str
    tokens: np.ndarray  # int32 [T], memory-mapped
    doc_starts: np.ndarray  # int64 [D], memory-mapped
    doc_lengths: np.ndarray  # int32 [D], memory-mapped
    num_keys: int
    counts: np.ndarray  # int32 [vocab]: keys per next token, memory-mapped

    @property
    def doc_ends(self) -> np.ndarray:
        return self.doc_starts + self.doc_lengths


class Store:
    """A loaded store (``load_store``): its manifest, key transform, the shards' memory-mapped
    token streams, counts and inverted lists, and the search over them.

    The mapped files must not change while the store is loaded; store files never do (they are
    immutable, schemas/FORMAT.md). If one is truncated anyway, the next read of a lost page kills
    the process with SIGBUS, which no exception handler can catch. ``check()`` finds that
    cheaply, before anything reads the pages: it compares every shard file the store opened with
    the manifest's size and re-reads each ``ivf.lists`` header (a zeroed header has no magic),
    reading nothing else; a long-running process can call it periodically (it
    costs a few system calls per shard file and a read of each list header, 8 bytes per list)
    and reload or stop on ``StoreFormatError``. It does
    not see bytes changed in place at the same size, such as the zeroed body of an ``ivf.lists``
    whose header was left intact (the shard's keys are then silently never found): only a
    checksum does (``dresd verify``, ``load_store(verify="full")``).
    """

    def __init__(self, path: Path, manifest: Manifest, transform: KeyTransform,
                 shards: list[_Shard], search: ShardedSearch):
        self.path = path
        self.manifest = manifest
        self.transform = transform
        self.shards = shards
        self.search = search
        self.value_len = manifest.value_len
        self.eos_token_id = manifest.model.eos_token_id
        self.vocab_size = manifest.model.vocab_size
        self.stats: StoreStats | None = None
        self.source = str(path)  # what was loaded: the directory, or the URL it mirrors
        self._checked: set[tuple[int, int]] = set()
        # store-relative path -> (st_dev, st_ino) of the file this process opened (load_store)
        self._opened: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Store({str(self.path)!r}, generation {m.generation}, {m.num_keys} keys, "
                f"model {m.model.name})")

    @property
    def num_keys(self) -> int:
        return self.manifest.num_keys

    def check(self) -> None:
        """Re-check, reading nothing but list headers, the shard files this store has open: each
        token stream, document table, counts array and inverted-list file still has the size
        the manifest records, and each ``ivf.lists`` header is still valid (magic, lists and
        code size of the quantizer, the shard's key count, the file's length). Raises
        ``StoreFormatError`` naming the first file that fails; returns None otherwise.

        Call it before reading from a store that may have been damaged (a long-running server,
        periodically): a truncated mapped file would otherwise kill the process with SIGBUS on
        the next read. It never touches the mapped pages itself. A file that was removed or
        replaced under its name since the load (``dresd gc`` dropping the generation this
        process holds, a cache refreshed by rename) is skipped: the process keeps the file it
        mapped, which the OS keeps intact. A same-size in-place overwrite that leaves the list
        header intact is not detected here; ``dresd verify`` checksums every byte.
        """
        nlist, code_size = self.search.nlist, int(self.search.ivf.code_size)
        for info in self.manifest.shards:
            for ref in (info.tokens, info.docs, info.counts, info.index):
                path = self.path / ref.path
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except FileNotFoundError:
                    continue  # removed since the load: the mapping keeps the file it opened
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        continue  # replaced by a symbolic link: not the file this store opened
                    raise StoreFormatError(f"{path} cannot be checked: {e}") from None
                with open(fd, "rb") as f:
                    st = os.fstat(fd)
                    opened = self._opened.get(ref.path)
                    if opened is not None and (st.st_dev, st.st_ino) != opened:
                        continue  # replaced under its name: the mapping keeps the old file
                    if st.st_size != ref.bytes:
                        raise StoreFormatError(
                            f"{path} is corrupt: {st.st_size} bytes, the manifest says "
                            f"{ref.bytes} (changed in place while loaded: reading past the end "
                            "of a truncated mapped file kills the process with SIGBUS)")
                    if ref is info.index:
                        read_lists_header(path, nlist, code_size, info.num_keys, file=f)

    def _bad(self, shard: _Shard, what: str) -> StoreFormatError:
        return StoreFormatError(f"shard {shard.shard_id} of {self.path}: {what}")

    def value(self, shard: int, position: int) -> np.ndarray:
        """The N tokens after ``position`` of shard number ``shard``, clipped at the document's
        end and EOS-padded. Element 0 is the key's next token."""
        sh = self.shards[shard]
        pos = int(position)
        if not 0 <= pos < len(sh.tokens) - 1:
            raise self._bad(sh, f"key position {pos} is outside its token stream of "
                                f"{len(sh.tokens)} tokens")
        d = int(np.searchsorted(sh.doc_starts, pos, side="right")) - 1
        end = min(pos + 1 + self.value_len, int(sh.doc_starts[d]) + int(sh.doc_lengths[d]),
                  len(sh.tokens))
        out = np.full(self.value_len, self.eos_token_id, np.int64)
        toks = sh.tokens[pos + 1 : end]
        if len(toks) == 0:
            raise self._bad(sh, f"position {pos} is the last token of its document: no key")
        if int(toks.min()) < 0 or int(toks.max()) >= self.vocab_size:
            raise self._bad(sh, f"token ids outside the model's vocabulary of {self.vocab_size} "
                                f"after position {pos}")
        out[: len(toks)] = toks
        return out

    def hit_value(self, shard: int, key_id: int, token: int | None = None) -> np.ndarray:
        """The value of a search hit (packed id), after checking the id against the stream."""
        tok, pos = (int(v) for v in unpack_ids(np.int64(key_id)))
        sh = self.shards[shard]
        if token is not None and tok != token:
            raise self._bad(sh, f"the index returned a key of token {tok} for token {token}")
        v = self.value(shard, pos)
        if v[0] != tok:
            raise self._bad(sh, f"index entry (token {tok}, position {pos}) does not match the "
                                f"token stream (token {int(v[0])} follows position {pos})")
        return v

    def continuations(self, query: np.ndarray, token: int, k: int,
                      nprobe: int | None = None) -> list[tuple[np.ndarray, float]]:
        """(value[1:], score) of the k nearest keys followed by ``token``; ``query`` is already
        transformed (dimension d, unit norm)."""
        shards, ids, scores = self.search.search(query, token, k, nprobe)
        return [(self.hit_value(s, i, token)[1:], float(sc))
                for s, i, sc in zip(shards.tolist(), ids.tolist(), scores.tolist())]

    def check_model(self, model, tokenizer) -> None:
        """Raise StoreMismatchError unless ``model`` and ``tokenizer`` are the store's."""
        from dresd.models import model_fingerprint, tokenizer_fingerprint

        ident = (id(model), id(tokenizer))
        if ident in self._checked:
            return
        built = self.manifest.model
        name = getattr(model, "name_or_path_for_store", None) or model.config.name_or_path
        tok_fp = tokenizer_fingerprint(tokenizer)
        if tok_fp != built.tokenizer_fingerprint:
            raise StoreMismatchError(
                f"store {self.path} was built with the tokenizer of {built.name} "
                f"({built.tokenizer_fingerprint[:12]}), not with the tokenizer of {name} "
                f"({tok_fp[:12]})"
            )
        fp = model_fingerprint(model, tokenizer)
        if fp != built.fingerprint:
            raise StoreMismatchError(
                f"store {self.path} was built for model {built.name} ({built.model_type}, "
                f"{built.fingerprint[:12]}), not for {name} ({model.config.model_type}, "
                f"{fp[:12]})"
            )
        self._checked.add(ident)


def _open_shard(root: Path, manifest: Manifest, info, base, nlist: int, code_size: int):
    sid = info.shard_id
    where = f"shard {sid} of {root}"
    # Every path comes from the manifest entry that check_present (and verification) checked:
    # the files loading reads are the files that were verified.
    try:
        tokens = shard_io.open_tokens(path := store_file(root, info.tokens.path))
        docs = shard_io.open_docs(path := store_file(root, info.docs.path))
    except pa.ArrowException as e:  # e.g. a file overwritten in place at its recorded size
        raise StoreFormatError(f"{path} is not a readable Arrow file: {e}") from None
    if len(tokens) != info.num_tokens or docs.num_rows != info.num_docs:
        raise StoreFormatError(f"{where} holds {len(tokens)} tokens and {docs.num_rows} "
                               f"documents, the manifest says {info.num_tokens} and "
                               f"{info.num_docs}")
    try:
        starts = docs.column("start").combine_chunks().to_numpy(zero_copy_only=True)
        lengths = docs.column("length").combine_chunks().to_numpy(zero_copy_only=True)
    except (KeyError, ValueError, TypeError) as e:
        raise StoreFormatError(f"{where}: unreadable document table ({e})") from None
    if len(starts) and (starts[0] != 0 or (lengths < 1).any()
                        or (starts[1:] != starts[:-1] + lengths[:-1]).any()
                        or int(starts[-1]) + int(lengths[-1]) != len(tokens)):
        raise StoreFormatError(f"{where}: the document table does not tile the token stream")
    if info.num_keys != len(tokens) - len(starts):
        raise StoreFormatError(f"{where}: {info.num_keys} keys in the manifest, but its "
                               f"{len(tokens)} tokens in {len(starts)} documents make "
                               f"{len(tokens) - len(starts)}")
    counts = shard_io.open_counts(store_file(root, info.counts.path), manifest.model.vocab_size,
                                  info.num_keys)
    lists = open_mmap_lists(store_file(root, info.index.path), nlist, code_size, info.num_keys)
    return (_Shard(sid, tokens, starts, lengths, info.num_keys, counts),
            shard_searcher(base, lists))


def load_store(
    path: str | os.PathLike,
    model=None,
    tokenizer=None,
    verify: bool | str = "auto",
    generation: int | None = None,
) -> Store:
    """Open the store at ``path`` (its current generation unless ``generation`` is given).

    ``path`` may be a URL (``s3://bucket/store``): the generation is first synced into a local
    cache, every file checksummed on download, and mapped from there (dresd.remote); a second
    load of the same generation downloads nothing.

    ``verify``: ``"auto"`` (default) checksums the small files read whole, ``"full"`` or True
    every file (see the module docstring), False none (sizes and structure are still checked).
    With ``model`` and ``tokenizer``, their fingerprints must equal the ones the store was
    built with.
    """
    import faiss

    mode = {True: "full", False: "none"}.get(verify, verify)
    if mode not in ("auto", "full", "none"):
        raise ValueError(f"verify must be True, False, 'auto' or 'full', not {verify!r}")
    t0 = time.perf_counter()
    source = str(path)
    if is_remote(source):  # s3://, gs://, ...: mirrored into the local cache (dresd.remote)
        root, generation, _ = sync_store(source, generation)
    else:
        root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no store at {root}")
    manifest = read_manifest(root, generation)
    spec = manifest.model
    if not manifest.shards or manifest.num_keys == 0:
        raise StoreFormatError(f"store {root} holds no keys: there is nothing to draft from")
    check_vocab(spec.vocab_size)
    check_present(root, manifest.serving_files())  # sizes, before anything is mapped
    opened = {}
    for ref in (f for s in manifest.shards for f in (s.tokens, s.docs, s.counts, s.index)):
        st = os.stat(store_file(root, ref.path))
        opened[ref.path] = (st.st_dev, st.st_ino)

    small = [manifest.transform.file, manifest.index.quantizer] + [
        f for s in manifest.shards for f in (s.docs, s.counts)]
    large = [f for s in manifest.shards for f in (s.tokens, s.index)]
    unverified = 0
    if mode == "full":
        report = verify_files(root, small + large)
        if report.corrupt:
            raise StoreFormatError(report.corrupt[0][1])
    elif mode == "auto":
        for ref in small:
            verify_file(root, ref)
        records = Records(root)
        unverified = sum(r.bytes for r in large if not records.is_verified(r))

    transform = KeyTransform.load(store_file(root, manifest.transform.file.path))
    if (transform.input_dim, transform.dim) != (spec.hidden_size, manifest.dim):
        raise StoreFormatError(
            f"transform {manifest.transform.file.path} maps {transform.input_dim} -> "
            f"{transform.dim}, the manifest says {spec.hidden_size} -> {manifest.dim}"
        )
    qpath = store_file(root, manifest.index.quantizer.path)
    try:
        base = faiss.read_index(str(qpath))
        ivf = faiss.extract_index_ivf(base)
    except RuntimeError as e:
        raise StoreFormatError(f"{qpath} is not a faiss IVF index: {e}") from None
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    if (ivf.d, nlist) != (manifest.dim, manifest.index.nlist) or base.ntotal != 0:
        raise StoreFormatError(f"{qpath}: d={ivf.d}, nlist={nlist}, {base.ntotal} keys; the "
                               f"manifest says an empty index, d={manifest.dim}, "
                               f"nlist={manifest.index.nlist}")

    shards, searchers = [], []
    for info in manifest.shards:
        shard, searcher = _open_shard(root, manifest, info, base, nlist, code_size)
        if mode == "full" and len(shard.tokens):
            lo, hi = int(shard.tokens.min()), int(shard.tokens.max())
            if lo < 0 or hi >= spec.vocab_size:
                raise StoreFormatError(
                    f"shard {info.shard_id} of {root} has token ids outside the model's "
                    f"vocabulary of {spec.vocab_size} (range {lo}..{hi})")
        shards.append(shard)
        searchers.append(searcher)
    search = ShardedSearch(base, searchers, [s.counts for s in shards],
                           nprobe=manifest.index.nprobe)
    store = Store(root, manifest, transform, shards, search)
    store.source = source
    store._opened = opened

    if model is not None and tokenizer is not None:
        store.check_model(model, tokenizer)

    disk = manifest.storage_bytes()
    n_tok = max(manifest.num_tokens, 1)
    if unverified:
        log.info("%s: %.0f MiB of token streams and inverted lists not yet verified; "
                 "`dresd verify %s` checks them once", root, unverified / 2**20, root)
    store.stats = StoreStats(
        load_s=time.perf_counter() - t0,
        num_shards=len(shards),
        num_docs=manifest.num_docs,
        num_tokens=manifest.num_tokens,
        num_keys=manifest.num_keys,
        resident_bytes=manifest.index.quantizer.bytes + manifest.transform.file.bytes
        + len(shards) * nlist * 32,
        mapped_bytes=disk["values"] + disk["index"] + disk["docs"],
        disk_bytes=disk,
        bytes_per_token={k: v / n_tok for k, v in disk.items()},
        unverified_bytes=unverified,
    )
    return store
