"""The store manifest: what a store is, generation by generation.

A manifest is written last, after every file it names is complete; creating it (only if absent)
is the commit (schemas.commit), and ``CURRENT`` is a hint updated after it. A reader that resolved
an older generation keeps reading files that no writer ever modifies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jsonschema

from schemas.commit import (
    commit_manifest,
    listed_generations,
    manifest_relpath,
    resolve_generation,
    update_current,
)
from schemas.errors import StoreFormatError
from schemas.layout import CURRENT_FILE, MANIFEST_DIR  # noqa: F401 - re-exported
from schemas.ranges import check_ranges
from schemas.storage import Store, store_io

FORMAT_VERSION = 2
# What an older store gets told. Format 1 (float16 keys in keys.lance, an IVF index per shard,
# everything loaded into RAM) cannot be opened by this code; its manifest names the model.
UPGRADE_HINT = ("rebuild it from its corpus with `dresd build NEW_STORE CORPUS...` (same "
                "model and options)")
_SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


@dataclass(frozen=True)
class FileRef:
    """A file or directory inside the store, relative to its root, with its content digest."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what the user passed: a directory or "default"
    fingerprint: str  # config + tokenizer + weights digest (dresd.models.model_fingerprint)
    tokenizer_fingerprint: str
    model_type: str
    hidden_size: int
    vocab_size: int
    eos_token_id: int


@dataclass(frozen=True)
class TransformSpec:
    file: FileRef
    input_dim: int
    dim: int
    sample_size: int
    explained_variance: float  # fraction of the z-scored variance the PCA keeps


@dataclass(frozen=True)
class IndexSpec:
    kind: str  # "ivf_flat" or "ivf_pq"
    nlist: int
    nprobe: int  # default at query time
    pq_m: int  # sub-quantizers (ivf_pq only; 0 otherwise)
    pq_nbits: int
    train_size: int  # keys the quantizer was trained on
    quantizer: FileRef  # trained, empty faiss index; shards hold only its inverted lists
    factory: str = ""  # faiss index_factory string of the quantizer, for the record
    code_size: int = 0  # bytes per key code in the inverted lists
    id_token_shift: int = 40  # index ids are (next_token << shift) | position (schemas.lists)


@dataclass(frozen=True)
class ArchiveFragment:
    """A shard's rows of the key archive: one Lance fragment, one data file."""

    file: FileRef  # archive.lance/data/<name>.lance
    lance: str  # the fragment's Lance metadata as JSON (FragmentMetadata.to_json()): the commit
    #             of an archive version lists the fragments it holds in this form


@dataclass(frozen=True)
class ArchiveSpec:
    """The version of the key archive (the Lance dataset ``archive.lance``) a generation covers:
    it holds exactly the fragments of the generation's shards."""

    path: str  # "archive.lance"
    version: int
    manifest: FileRef  # the Lance manifest file of that version
    rows: int  # keys in it

    @classmethod
    def from_dict(cls, d: dict) -> ArchiveSpec:
        return cls(**{**d, "manifest": FileRef(**d["manifest"])})


@dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    num_docs: int
    num_tokens: int
    num_keys: int
    tokens: FileRef  # token stream (serving)
    docs: FileRef  # document table (serving)
    index: FileRef  # inverted lists of the shard's keys (serving)
    counts: FileRef  # keys per next token, int32 [vocab] (serving)
    generation_added: int
    keys: FileRef | None = None  # keys.npy: the key archive of a store written before Lance
    archive: ArchiveFragment | None = None  # the shard's rows of archive.lance

    def serving_files(self) -> tuple[FileRef, ...]:
        """The files the runtime maps or reads."""
        return (self.tokens, self.docs, self.index, self.counts)

    def archive_files(self) -> tuple[FileRef, ...]:
        """The shard's float keys, which the runtime never opens."""
        return (((self.keys,) if self.keys else ())
                + ((self.archive.file,) if self.archive else ()))

    def files(self) -> tuple[FileRef, ...]:
        """Every file of the shard the manifest names (the archive last, when kept)."""
        return self.serving_files() + self.archive_files()

    @classmethod
    def from_dict(cls, s: dict) -> ShardInfo:
        def ref(x: dict | None) -> FileRef | None:
            return FileRef(**x) if x else None

        archive = s.get("archive")
        return cls(**{
            **s,
            **{name: ref(s.get(name)) for name in ("tokens", "docs", "index", "counts", "keys")},
            "archive": ArchiveFragment(file=ref(archive["file"]), lance=archive["lance"])
            if archive else None,
        })


@dataclass(frozen=True)
class Manifest:
    generation: int
    model: ModelSpec
    layer: int  # hidden_states index the keys come from (-1: final layer, after the final norm)
    value_len: int  # N, tokens per value
    transform: TransformSpec
    index: IndexSpec
    shards: tuple[ShardInfo, ...]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    format_version: int = FORMAT_VERSION
    parent_generation: int | None = None
    note: str = ""
    archive: ArchiveSpec | None = None  # the key archive's version (None: no archive kept)

    @property
    def dim(self) -> int:
        return self.transform.dim

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_keys(self) -> int:
        return sum(s.num_keys for s in self.shards)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    def storage_bytes(self) -> dict[str, int]:
        """Bytes on disk by part. The serving set is what the runtime maps or reads: values
        (token streams), index (inverted lists: codes + ids), docs (document tables and next-token
        counts) and shared
        (transform + quantizer, once per store); the archive (float16 keys) it never opens."""
        sh = self.shards
        parts = {
            "values": sum(s.tokens.bytes for s in sh),
            "index": sum(s.index.bytes for s in sh),
            "docs": sum(s.docs.bytes + s.counts.bytes for s in sh),
            "shared": self.transform.file.bytes + self.index.quantizer.bytes,
        }
        parts["serving"] = sum(parts.values())
        parts["archive"] = sum(f.bytes for f in self.archive_files())
        parts["total"] = parts["serving"] + parts["archive"]
        return parts

    def serving_files(self) -> tuple[FileRef, ...]:
        """What the runtime maps or reads: transform, quantizer, the shards' serving files."""
        return (self.transform.file, self.index.quantizer) + tuple(
            f for s in self.shards for f in s.serving_files())

    def archive_files(self) -> tuple[FileRef, ...]:
        """The key archive: its version manifest and the shards' fragments."""
        return ((self.archive.manifest,) if self.archive else ()) + tuple(
            f for s in self.shards for f in s.archive_files())

    def files(self) -> tuple[FileRef, ...]:
        """Every file this generation names: the serving set, then the archive."""
        return self.serving_files() + self.archive_files()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dim"] = self.dim
        d["shards"] = [asdict(s) for s in self.shards]
        if self.archive is None:
            del d["archive"]  # a store without one writes what format 2 always wrote
        for s in d["shards"]:
            for name in ("keys", "archive"):
                if s[name] is None:
                    del s[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        validate_manifest_dict(d)
        d = {k: v for k, v in d.items() if k != "sha256"}

        def ref(x: dict) -> FileRef:
            return FileRef(**x)

        t = d["transform"]
        i = d["index"]
        return cls(
            generation=d["generation"],
            model=ModelSpec(**d["model"]),
            layer=d["layer"],
            value_len=d["value_len"],
            transform=TransformSpec(**{**t, "file": ref(t["file"])}),
            index=IndexSpec(**{**i, "quantizer": ref(i["quantizer"])}),
            shards=tuple(ShardInfo.from_dict(s) for s in d["shards"]),
            archive=ArchiveSpec.from_dict(d["archive"]) if d.get("archive") else None,
            created=d["created"],
            format_version=d["format_version"],
            parent_generation=d.get("parent_generation"),
            note=d.get("note", ""),
        )


@functools.cache
def _schema() -> dict:
    return json.loads(_SCHEMA_PATH.read_text())


def validate_manifest_dict(d: dict) -> None:
    if not isinstance(d, dict):
        raise StoreFormatError("manifest is not a JSON object")
    version = d.get("format_version")
    if isinstance(version, int) and 0 < version < FORMAT_VERSION:
        raise StoreFormatError(
            f"store format {version} is no longer supported (this dresd reads format "
            f"{FORMAT_VERSION}): {UPGRADE_HINT}")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"store format version {version!r} is not supported (this dresd reads {FORMAT_VERSION})"
        )
    try:
        jsonschema.validate(d, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise StoreFormatError(f"invalid manifest at {where}: {e.message}") from None
    check_ranges(d)


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """sha256 and size of a file, or of a directory's files in sorted relative-path order."""
    path = Path(path)
    h = hashlib.sha256()
    total = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise StoreFormatError(f"{path} does not exist or is empty")
    for p in files:
        if p != path:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                total += len(chunk)
    return h.hexdigest(), total


def make_file_ref(store: str | os.PathLike, relpath: str) -> FileRef:
    digest, size = file_digest(Path(store) / relpath)
    return FileRef(path=relpath, sha256=digest, bytes=size)


def generation_path(store: str | os.PathLike, generation: int) -> Path:
    return Path(store) / MANIFEST_DIR / f"gen-{generation:06d}.json"


def list_generations(store: Store) -> list[int]:
    """Committed generations, oldest first (manifest files named ``gen-NNNNNN.json``)."""
    return listed_generations(store_io(store))


def current_generation(store: Store) -> int:
    """The newest committed generation: ``CURRENT`` is a hint (see schemas.commit)."""
    return resolve_generation(store)


def read_manifest(store: Store, generation: int | None = None) -> Manifest:
    """The live manifest (or a given generation) of a store, local or at a URL."""
    io = store_io(store)
    if generation is None:
        generation = current_generation(io)
    rel = manifest_relpath(generation)
    path = io.where(rel)
    try:
        raw = io.read(rel)
    except FileNotFoundError:
        raise StoreFormatError(f"manifest generation {generation} is missing: {path}") from None
    except IsADirectoryError:
        raise StoreFormatError(f"manifest {path} is a directory, not a file") from None
    return parse_manifest(raw, path, generation)


def parse_manifest(raw: bytes, path: str | os.PathLike, generation: int) -> Manifest:
    """The manifest of ``generation`` from its file's bytes (read from ``path``, named in
    errors), with every check ``read_manifest`` makes: UTF-8 JSON, schema and ranges, the
    sealed written form, the generation its file name says."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise StoreFormatError(f"manifest {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise StoreFormatError(f"manifest {path} is not valid JSON: {e.msg} at line {e.lineno} "
                               f"column {e.colno}") from None
    validate_manifest_dict(d)  # the format version first: an old store gets the upgrade hint
    _check_written_form(path, raw, d)
    manifest = Manifest.from_dict(d)
    if manifest.generation != generation:
        raise StoreFormatError(f"manifest {path} says it is generation {manifest.generation}: "
                               "a manifest's generation is the number in its file name")
    return manifest


def _content_digest(d: dict) -> str:
    """sha256 of the manifest's content: every field but ``sha256``, in canonical form."""
    content = {k: v for k, v in d.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _render(d: dict) -> bytes:
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest file: its content, checksummed by its ``sha256`` field, in the one form
    dresd writes (so any changed byte, even one that keeps the JSON valid, is detected)."""
    d = manifest.to_dict()
    validate_manifest_dict(d)
    return _render({**d, "sha256": _content_digest(d)})


def _check_written_form(path: Path, raw: bytes, d: dict) -> None:
    if "sha256" not in d:
        raise StoreFormatError(f"manifest {path} has no sha256 field: it was written before "
                               f"manifests were sealed, or the field was removed; "
                               f"{UPGRADE_HINT}")
    if d.get("sha256") != _content_digest(d):
        raise StoreFormatError(f"manifest {path} is corrupt: its content does not match its "
                               "sha256 field")
    if raw != _render(d):
        raise StoreFormatError(f"manifest {path} is corrupt: its bytes are not the form dresd "
                               "writes (changed whitespace or formatting)")


def write_manifest(store: Store, manifest: Manifest) -> str:
    """Commit a new generation, then point ``CURRENT`` at it (schemas.commit).

    The manifest is created only if absent: of two writers racing for the same generation
    number exactly one wins; the other gets ``CommitConflictError`` and nothing is replaced.
    """
    io = store_io(store)
    commit_manifest(io, manifest.generation, manifest_bytes(manifest))
    update_current(io, manifest.generation)
    return io.where(manifest_relpath(manifest.generation))
