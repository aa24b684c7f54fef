"""How a generation is committed, and how readers find the newest committed one.

One commit point: the creation of ``manifests/gen-N.json`` with create-if-absent semantics,
where N is the parent generation + 1. Everything the manifest names is written before it, under
names no other writer uses; the manifest is created whole or not at all. Of two writers racing
for the same N exactly one creates the file; the other gets ``CommitConflictError`` and its
shards are garbage for ``dresd gc``.

``CURRENT`` is only a hint, replaced after the commit. Readers take the generation it names
and then probe N+1, N+2, ... (generations are committed one after another), so a crash between
the manifest and ``CURRENT`` leaves the store loadable at the new generation, never stuck.
Without ``CURRENT`` (a first build that crashed right after its commit) readers list
``manifests/``. A ``CURRENT`` that is not exactly ``manifests/gen-NNNNNN.json`` plus a newline,
or that names a generation which does not exist, is a ``StoreFormatError``: a flipped byte is
detected, not trusted. Error messages never quote file contents.

The two storage operations the protocol needs, an exclusive create and a whole replace, are
``StoreIO``'s (schemas.storage): locally a temp file, fsync and ``os.link`` (which fails if the
target exists) and ``os.replace`` for the hint; on object storage a put with
``If-None-Match: "*"`` and a plain put. Every function here takes a store location or its
``StoreIO``.
"""

from __future__ import annotations

import re

from schemas.errors import StoreFormatError
from schemas.layout import CURRENT_FILE, MANIFEST_DIR
from schemas.storage import Store, StoreIO, store_io

MANIFEST_NAME = re.compile(r"gen-(\d{6})\.json")
CURRENT_TEXT = re.compile(rb"manifests/gen-(\d{6})\.json\n")
MAX_GENERATION = 999_999


class CommitConflictError(RuntimeError):
    """Another writer committed the generation this run was going to commit."""


def manifest_relpath(generation: int) -> str:
    return f"{MANIFEST_DIR}/gen-{generation:06d}.json"


def current_text(generation: int) -> bytes:
    return f"{manifest_relpath(generation)}\n".encode()


def listed_generations(io: StoreIO) -> list[int]:
    """Generations whose manifest file exists (temp files and other names ignored)."""
    out = []
    for name in io.listdir(MANIFEST_DIR):
        m = MANIFEST_NAME.fullmatch(name)
        if m and int(m.group(1)) >= 1:
            out.append(int(m.group(1)))
    return sorted(out)


def read_current_hint(store: Store) -> int | None:
    """The generation ``CURRENT`` names, None when it is absent or empty (a torn write).

    Anything else that is not exactly ``manifests/gen-NNNNNN.json`` and a newline is a
    StoreFormatError that does not quote the file.
    """
    io = store_io(store)
    try:
        raw = io.read(CURRENT_FILE)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise StoreFormatError(f"{io.where(CURRENT_FILE)} is a directory, not a file") from None
    if not raw.strip():
        return None
    m = CURRENT_TEXT.fullmatch(raw)
    if not m or int(m.group(1)) < 1:
        raise StoreFormatError(
            f"{io.where(CURRENT_FILE)} is corrupt: it must hold exactly "
            f"'{MANIFEST_DIR}/gen-NNNNNN.json' and a newline ({len(raw)} bytes found); delete it "
            "and the newest committed generation is found by listing manifests/")
    return int(m.group(1))


def resolve_generation(store: Store) -> int:
    """The newest committed generation of a store (see the module docstring)."""
    io = store_io(store)
    hint = read_current_hint(io)
    if hint is None:
        listed = listed_generations(io)
        if not listed:
            raise StoreFormatError(
                f"{io.where()} is not a dresd store: {CURRENT_FILE} is missing and no generation "
                "is committed")
        return listed[-1]
    if not io.exists(manifest_relpath(hint)):
        raise StoreFormatError(
            f"{io.where(CURRENT_FILE)} is corrupt: it names generation {hint}, whose "
            f"manifest does not exist; delete it and the newest committed generation is found "
            "by listing manifests/")
    generation = hint
    while generation < MAX_GENERATION and io.exists(manifest_relpath(generation + 1)):
        generation += 1
    return generation


def newest_generation(store: Store) -> int:
    """The newest committed generation, 0 when none is (a new or never committed store)."""
    try:
        return resolve_generation(store)
    except StoreFormatError:
        io = store_io(store)
        if read_current_hint(io) is None and not listed_generations(io):
            return 0
        raise


def commit_manifest(store: Store, generation: int, data: bytes) -> None:
    """Create the manifest of ``generation``: the commit point. CommitConflictError if it
    exists (another writer committed it first)."""
    io = store_io(store)
    try:
        io.create_exclusive(manifest_relpath(generation), data)
    except FileExistsError:
        raise CommitConflictError(
            f"generation {generation} already exists in {io.where()}: another writer committed it "
            f"while this run was working from generation {generation - 1}; rerun the command "
            "(the shards this run wrote are left for `dresd gc`)") from None


def update_current(store: Store, generation: int) -> None:
    """Point the ``CURRENT`` hint at ``generation`` unless it already names a newer one."""
    io = store_io(store)
    try:
        hint = read_current_hint(io)
    except StoreFormatError:
        hint = None  # a corrupt hint is repaired by this write
    if hint is not None and hint > generation and io.exists(manifest_relpath(hint)):
        return
    io.replace(CURRENT_FILE, current_text(generation))
