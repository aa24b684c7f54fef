"""Where a store or a corpus lives: a local path, or a URL (``s3://bucket/prefix``, ``gs://``,
``hdfs://``, ...) reached through one filesystem layer, fsspec.

Why fsspec, not Beam's ``FileSystems`` or ``pyarrow.fs``: the commit protocol needs a create that
fails when the object exists (S3's conditional put, ``If-None-Match: "*"``), and only fsspec
exposes one (``pipe_file(..., mode="create")``: s3fs sends the header and turns the 412 into
``FileExistsError``); Beam's ``FileSystems`` and ``pyarrow.fs`` only overwrite. The runtime needs
the layer too (``dresd.load_store("s3://...")``) and must not import Beam. fsspec is one small
dependency with s3fs, gcsfs and an HDFS driver behind the same calls, and a URL alone selects the
backend (so a step that pickles only a URL string runs on any worker).

Stores are accepted only where the exclusive create is known to hold (``EXCLUSIVE_CREATE``:
S3); corpora may be on any filesystem fsspec reads.

Local paths never come through here: every local read and write stays on the ``pathlib``/``os``
code it had, so a local store behaves exactly as before. A remote store is worked on through
``staged``: a step copies the files it reads into a local temporary directory laid out like the
store, runs the same local writers and readers on it, and uploads what it created. Object stores
show an object whole or not at all, every new file goes under a name no other writer uses (a new
shard id, a content-addressed transform or quantizer), and nothing is referenced until the
manifest, created last, names it with its checksum.

S3 settings come from the environment: credentials and region as boto3 reads them
(``AWS_ACCESS_KEY_ID``, ...), the endpoint of an S3-API server other than AWS from
``DRESD_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def scheme(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(location: str | os.PathLike) -> bool:
    """A URL (anything with a scheme, ``file://`` too: it goes through fsspec), not a path."""
    return scheme(location) != ""


def join(root: str, relpath: str) -> str:
    """``root/relpath`` for a URL (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    return f"{root.rstrip('/')}/{relpath.lstrip('/')}" if relpath else root.rstrip("/")


def storage_options(url: str) -> dict:
    """fsspec options for a URL, from the environment."""
    if scheme(url) in ("s3", "s3a"):
        opts: dict = {"use_listings_cache": False}  # a listing must see a commit at once
        endpoint = (os.environ.get("DRESD_S3_ENDPOINT_URL")
                    or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


# Filesystems whose fsspec backend is known to send a create that fails when the object exists
# (checked here against an S3-API server). A backend that ignored ``mode="create"`` would
# overwrite a manifest another writer committed, so a store elsewhere is refused up front.
EXCLUSIVE_CREATE = ("s3", "s3a")


def check_store_location(url: str) -> None:
    """A store URL must be on a filesystem whose exclusive create the commit can rely on."""
    if scheme(url) not in EXCLUSIVE_CREATE:
        raise ValueError(f"{url}: a store on {scheme(url)}:// is not supported yet (the commit "
                         "needs a create-if-absent this backend is not known to provide; "
                         "supported: s3://, local paths); a corpus may be anywhere fsspec reads")


def filesystem(url: str):
    """(fsspec filesystem, path without the scheme) of a URL."""
    import logging

    import fsspec

    # aiobotocore logs at INFO where it found credentials, on every process: noise in a CLI.
    logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as e:  # the backend is an optional package (s3fs: the 's3' extra)
        raise RuntimeError(f"{url}: {e}") from None


class ObjectStoreIO:
    """``StoreIO`` (schemas.commit) on a store at a URL, plus the few calls a builder needs.

    ``create_exclusive`` is a conditional put: on S3 ``PutObject`` with ``If-None-Match: "*"``,
    which the service refuses (412) when the key exists, so of two writers exactly one creates a
    manifest. ``replace`` is a plain put: an object store shows the old or the new object, never
    a mix.
    """

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self._fs = None
        self._root = None

    def __getstate__(self):  # picklable into pipeline steps: the URL only
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = filesystem(self.url)
        return self._fs

    def path(self, relpath: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return join(self._root, relpath)

    def location(self, relpath: str = "") -> str:
        return join(self.url, relpath)

    def create_exclusive(self, relpath: str, data: bytes) -> None:
        check_store_location(self.url)
        try:
            self.fs.pipe_file(self.path(relpath), data, mode="create")
        except FileExistsError:
            raise
        except OSError as e:
            # A 409 ConditionalRequestConflict is a concurrent conditional put to the same key:
            # this writer did not create it, so it must not claim the commit.
            if "ConditionalRequestConflict" in str(e) or "pre-condition" in str(e).lower():
                raise FileExistsError(self.location(relpath)) from None
            raise

    def replace(self, relpath: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(relpath), data)

    def read(self, relpath: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relpath))
        except FileNotFoundError:
            raise FileNotFoundError(self.location(relpath)) from None

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    def listdir(self, relpath: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(relpath), detail=False)
        except FileNotFoundError:
            return []
        base = self.path(relpath).rstrip("/")
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.rstrip("/") != base)

    def remove(self, relpath: str) -> None:
        """Remove a file or everything under a prefix; absent is fine."""
        try:
            self.fs.rm(self.path(relpath), recursive=True)
        except FileNotFoundError:
            pass

    def get(self, relpaths: list[str], local_root: Path) -> None:
        """Download ``relpaths`` to the same relative paths under ``local_root``."""
        if not relpaths:
            return
        for rel in relpaths:
            (local_root / rel).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get([self.path(r) for r in relpaths], [str(local_root / r) for r in relpaths])

    def put(self, local_root: Path, relpaths: list[str]) -> None:
        """Upload ``local_root/rel`` to ``rel`` in the store, for each of ``relpaths``."""
        if relpaths:
            self.fs.put([str(local_root / r) for r in relpaths],
                        [self.path(r) for r in relpaths])


def bucket_exists(url: str) -> bool:
    """Whether the bucket (the first component after the scheme) of a URL exists."""
    fs, path = filesystem(url)
    return fs.exists(path.split("/", 1)[0])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@contextmanager
def staged(store: str | os.PathLike, fetch: Iterable[str] = ()) -> Iterator[Path]:
    """A local directory laid out like ``store`` for the local readers and writers.

    For a local store: the store itself, nothing copied. For a remote one: a temporary directory
    holding the files ``fetch`` names (store-relative paths); when the block ends without an
    error, every file created or changed in it is uploaded and every fetched file it removed is
    removed from the store; then the directory goes. After an error nothing is uploaded.
    """
    if not is_remote(store):
        yield Path(store)
        return
    io = ObjectStoreIO(str(store))
    with tempfile.TemporaryDirectory(prefix="dresd-stage-") as tmp:
        root = Path(tmp)
        fetch = list(dict.fromkeys(fetch))
        io.get(fetch, root)
        before = _snapshot(root)
        yield root
        after = _snapshot(root)
        changed = sorted(rel for rel, stamp in after.items()
                         if before.get(rel) != stamp and not _is_scratch(rel))
        io.put(root, changed)
        for rel in fetch:
            if rel not in after:
                io.remove(rel)


def _is_scratch(relpath: str) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".part")


# --- corpus files ---------------------------------------------------------------------------


def list_files(url: str, glob: str) -> list[str] | None:
    """Files under a remote directory matching ``glob`` (as URLs), or [url] when ``url`` is a
    file; None when nothing is there."""
    fs, path = filesystem(url)
    proto = scheme(url)
    if fs.isdir(path):
        found = sorted(p for p in fs.glob(join(path, glob)) if fs.isfile(p))
        return [f"{proto}://{p}" for p in found]
    if fs.isfile(path):
        return [url]
    return None


def open_input(path: str):
    """A binary file object for reading a corpus file, local or remote."""
    if not is_remote(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open(p, "rb")


def file_size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return int(fs.size(p))


def file_stamp(path: str) -> list:
    """What identifies a corpus file's version: absolute path, size, mtime (local) or ETag."""
    if not is_remote(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    fs, p = filesystem(path)
    info = fs.info(p)
    version = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or
                                                          info.get("mtime") or "")
    return [path, int(info.get("size") or 0), str(version)]


def location_key(location: str) -> str:
    """A short digest naming a store location in local caches."""
    return hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
