"""``load_store``: open a store directory for decoding.

Loading validates the manifest and (by default) every file's checksum, memory-maps the token
streams, loads the key transform, the keys and the shards' IVF indexes, and builds the search
that filters by next token inside the search (dresd.search). Values are never materialised: the
value of a key is read from the memory-mapped token stream when a query returns the key.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dresd.search import KeySearch
from dresd.transform import KeyTransform
from schemas import FileRef, Manifest, StoreFormatError, file_digest, read_manifest, shard_io


class StoreMismatchError(ValueError):
    """The store was built for another model or tokenizer than the one decoding with it."""


@dataclass(frozen=True)
class StoreStats:
    load_s: float
    num_shards: int
    num_docs: int
    num_tokens: int
    num_keys: int
    resident_bytes: int  # arrays held in memory (memory-mapped token streams excluded)
    mapped_bytes: int  # token streams, memory-mapped
    disk_bytes: dict  # keys, values, index: bytes on disk
    bytes_per_token: dict  # the same per corpus token

    def summary(self) -> str:
        per = ", ".join(f"{k} {v:.1f}" for k, v in self.bytes_per_token.items())
        return (
            f"{self.num_shards} shards, {self.num_docs} docs, {self.num_tokens} tokens, "
            f"{self.num_keys} keys | loaded in {self.load_s:.2f}s | resident "
            f"{self.resident_bytes / 2**20:.1f} MiB + {self.mapped_bytes / 2**20:.1f} MiB mapped "
            f"| bytes/token on disk: {per}"
        )


@dataclass
class _Shard:
    shard_id: str
    tokens: np.ndarray  # int32 [T], memory-mapped
    doc_starts: np.ndarray  # int64 [D]
    doc_ends: np.ndarray  # int64 [D]
    pos: np.ndarray  # int64 [K]


class Store:
    def __init__(self, path: Path, manifest: Manifest, transform: KeyTransform,
                 shards: list[_Shard], key_offsets: np.ndarray, search: KeySearch):
        self.path = path
        self.manifest = manifest
        self.transform = transform
        self.shards = shards
        self.key_offsets = key_offsets  # [S + 1] first global key id of each shard
        self.search = search
        self.value_len = manifest.value_len
        self.eos_token_id = manifest.model.eos_token_id
        self.stats: StoreStats | None = None
        self._checked: set[tuple[int, int]] = set()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Store({str(self.path)!r}, generation {m.generation}, {m.num_keys} keys, "
                f"model {m.model.name})")

    @property
    def num_keys(self) -> int:
        return int(self.key_offsets[-1])

    def value(self, key: int) -> np.ndarray:
        """The N tokens after the key's position, clipped at its document's end, EOS-padded.
        Element 0 is the key's next token."""
        key = int(key)
        if not 0 <= key < self.num_keys:
            raise IndexError(f"key {key} is outside the store's {self.num_keys} keys")
        s = int(np.searchsorted(self.key_offsets, key, side="right")) - 1
        shard = self.shards[s]
        pos = int(shard.pos[key - self.key_offsets[s]])
        d = int(np.searchsorted(shard.doc_starts, pos, side="right")) - 1
        end = min(pos + 1 + self.value_len, int(shard.doc_ends[d]))
        out = np.full(self.value_len, self.eos_token_id, np.int64)
        toks = shard.tokens[pos + 1 : end]
        out[: len(toks)] = toks
        return out

    def continuations(self, query: np.ndarray, token: int, k: int,
                      nprobe: int | None = None) -> list[tuple[np.ndarray, float]]:
        """(value[1:], score) of the k nearest keys followed by ``token``; ``query`` is already
        transformed (dimension d, unit norm)."""
        keys, scores = self.search.search(query, token, k, nprobe)
        return [(self.value(g)[1:], float(sc)) for g, sc in zip(keys.tolist(), scores.tolist())]

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


def _verify(root: Path, ref: FileRef) -> None:
    digest, size = file_digest(root / ref.path)
    if digest != ref.sha256 or size != ref.bytes:
        raise StoreFormatError(
            f"{root / ref.path} is corrupt: its checksum does not match the manifest "
            f"(sha256 {digest[:12]}, {size} bytes; manifest {ref.sha256[:12]}, {ref.bytes} bytes)"
        )


def load_store(
    path: str | os.PathLike,
    model=None,
    tokenizer=None,
    verify: bool = True,
    generation: int | None = None,
    exact_threshold: int = 4096,
) -> Store:
    """Open the store at ``path`` (its current generation unless ``generation`` is given).

    With ``verify``, every file named by the manifest is checksummed first and token ids are
    checked against the model's vocabulary. With ``model`` and ``tokenizer``, their fingerprints
    must equal the ones the store was built with.
    """
    import faiss

    t0 = time.perf_counter()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no store at {root}")
    manifest = read_manifest(root, generation)
    spec = manifest.model
    if not manifest.shards or manifest.num_keys == 0:
        raise StoreFormatError(f"store {root} holds no keys: there is nothing to draft from")
    if verify:
        _verify(root, manifest.transform.file)
        _verify(root, manifest.index.quantizer)
        for info in manifest.shards:
            for ref in (info.tokens, info.docs, info.keys, info.index):
                _verify(root, ref)

    transform = KeyTransform.load(root / manifest.transform.file.path)
    if (transform.input_dim, transform.dim) != (spec.hidden_size, manifest.dim):
        raise StoreFormatError(
            f"transform {manifest.transform.file.path} maps {transform.input_dim} -> "
            f"{transform.dim}, the manifest says {spec.hidden_size} -> {manifest.dim}"
        )

    shards, vectors, next_tokens, parts = [], [], [], []
    key_offsets = [0]
    resident = 0
    mapped = 0
    for info in manifest.shards:
        sid = info.shard_id
        tokens = shard_io.read_tokens(root, sid)
        docs = shard_io.read_docs(root, sid)
        vec, pos, nxt = shard_io.read_keys(root, sid)
        where = f"shard {sid} of {root}"
        if len(tokens) != info.num_tokens or len(pos) != info.num_keys:
            raise StoreFormatError(
                f"{where} holds {len(tokens)} tokens and {len(pos)} keys, the manifest says "
                f"{info.num_tokens} and {info.num_keys}"
            )
        if vec.shape[1] != manifest.dim:
            raise StoreFormatError(f"{where} has keys of dimension {vec.shape[1]}, "
                                   f"the manifest says {manifest.dim}")
        if verify and len(tokens):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= spec.vocab_size:
                raise StoreFormatError(
                    f"{where} has token ids outside the model's vocabulary of "
                    f"{spec.vocab_size} (range {lo}..{hi})"
                )
        if len(pos) and (pos.min() < 0 or pos.max() + 1 >= max(len(tokens), 1)):
            raise StoreFormatError(f"{where} has key positions outside its token stream")
        starts = docs.column("start").to_numpy().astype(np.int64)
        ends = starts + docs.column("length").to_numpy().astype(np.int64)
        index = faiss.read_index(str(root / info.index.path))
        if index.ntotal != len(pos):
            raise StoreFormatError(f"{where}: ivf.faiss holds {index.ntotal} keys, the key "
                                   f"table {len(pos)}")
        parts.append((index, key_offsets[-1]))
        shards.append(_Shard(sid, tokens, starts, ends, pos.astype(np.int64)))
        vectors.append(vec)
        next_tokens.append(nxt)
        key_offsets.append(key_offsets[-1] + len(pos))
        mapped += tokens.nbytes
        resident += pos.nbytes + starts.nbytes + ends.nbytes

    search = KeySearch(
        np.concatenate(vectors),
        np.concatenate(next_tokens),
        parts,
        nprobe=manifest.index.nprobe,
        exact_threshold=exact_threshold,
    )
    resident += search.vectors.nbytes + search.order.nbytes + search.offsets.nbytes
    resident += _index_bytes(search.index)
    store = Store(root, manifest, transform, shards, np.asarray(key_offsets, np.int64), search)

    if model is not None and tokenizer is not None:
        store.check_model(model, tokenizer)

    disk = {
        "keys": sum(s.keys.bytes for s in manifest.shards),
        "values": sum(s.tokens.bytes for s in manifest.shards),  # as `dresd info` counts
        "index": sum(s.index.bytes for s in manifest.shards),
    }
    n_tok = max(manifest.num_tokens, 1)
    store.stats = StoreStats(
        load_s=time.perf_counter() - t0,
        num_shards=len(shards),
        num_docs=manifest.num_docs,
        num_tokens=manifest.num_tokens,
        num_keys=manifest.num_keys,
        resident_bytes=resident,
        mapped_bytes=mapped,
        disk_bytes=disk,
        bytes_per_token={k: v / n_tok for k, v in disk.items()},
    )
    return store


def _index_bytes(index) -> int:
    if index is None:
        return 0
    import faiss

    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    entries = sum(inv.list_size(i) for i in range(ivf.nlist))
    return entries * (inv.code_size + 8)
