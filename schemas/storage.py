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

One interface, ``StoreIO``, with the same operations on a local directory (``LocalStoreIO``)
and on object storage (``ObjectStoreIO``), chosen once by ``store_io(location)`` where a store
location enters the API; every other module works on the ``StoreIO`` it is given and never asks
which kind it holds. What must differ lives inside the two implementations:

- the exclusive create of the commit: a hard link of a complete temp file (fails if the target
  exists) locally, a conditional put (``If-None-Match: "*"``) on S3;
- reads refuse symbolic links below a local store's root (schemas.paths); objects have none;
- ``staged``: the local readers and writers (Arrow, numpy, faiss) need a directory. Locally it
  is the store itself, nothing copied; on object storage a temporary directory laid out like the
  store, into which the files a step reads are fetched and from which what it created is
  uploaded. Object stores show an object whole or not at all, every new file goes under a name
  no other writer uses (a new shard id, a content-addressed transform or quantizer), and nothing
  is referenced until the manifest, created last, names it with its checksum.

Corpus files (read only) go through fsspec on both kinds of location: a local path is fsspec's
local filesystem, so ``open_input``, ``file_size`` and ``file_stamp`` are one code path.

S3 settings come from the environment: credentials and region as boto3 reads them
(``AWS_ACCESS_KEY_ID``, ...), the endpoint of an S3-API server other than AWS from
``DRESD_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import StorageError
from schemas.paths import store_file


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


@dataclass(frozen=True)
class Usage:
    """What lies at a store path: its bytes (all files under it) and the newest modification
    time (seconds since the epoch) of anything there."""

    bytes: int
    newest: float


class StoreIO(ABC):
    """The operations on a store's files, on paths relative to its root.

    Picklable as its location alone, so a pipeline step that captures one runs on any worker.
    Invariants both implementations keep: ``create_exclusive`` of an existing path raises
    ``FileExistsError`` and changes nothing; ``replace`` and ``put`` show readers the old or the
    new bytes, never a mix; ``remove`` of an absent path is not an error.
    """

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)

    def __getstate__(self):
        return {"location": self.location}

    def __setstate__(self, state):
        self.__init__(state["location"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.location == self.location

    def __hash__(self) -> int:
        return hash((type(self), self.location))

    def __str__(self) -> str:
        return self.location

    @abstractmethod
    def where(self, relpath: str = "") -> str:
        """The location of ``relpath`` for people: a path or a URL."""

    @abstractmethod
    def create_exclusive(self, relpath: str, data: bytes) -> None:
        """Create ``relpath`` holding ``data``, whole, or raise FileExistsError if it exists."""

    @abstractmethod
    def replace(self, relpath: str, data: bytes) -> None:
        """Create or overwrite ``relpath`` with ``data``; readers see the old or the new bytes."""

    @abstractmethod
    def read(self, relpath: str) -> bytes:
        """The bytes of ``relpath``; FileNotFoundError if absent."""

    @abstractmethod
    def exists(self, relpath: str) -> bool: ...

    @abstractmethod
    def listdir(self, relpath: str) -> list[str]:
        """Names of the entries directly under ``relpath`` ([] when it does not exist)."""

    @abstractmethod
    def usage(self, relpath: str) -> Usage | None:
        """Bytes and newest modification time at or under ``relpath``; None when absent."""

    @abstractmethod
    def remove(self, relpath: str) -> None:
        """Remove a file or everything under ``relpath``; absent is fine."""

    @abstractmethod
    def get(self, relpaths: list[str], local_root: Path) -> None:
        """Copy ``relpaths`` to the same relative paths under ``local_root``."""

    @abstractmethod
    def put(self, local_root: Path, relpaths: list[str]) -> None:
        """Copy ``local_root/rel`` to ``rel`` in the store, for each of ``relpaths``."""

    @abstractmethod
    def staged(self, fetch: Iterable[str] = ()):
        """A context manager: a local directory laid out like the store for the local readers
        and writers, holding at least the files ``fetch`` names (store-relative paths). When
        the block ends without an error, what was created or changed in it is in the store and
        the fetched files it removed are gone from the store; after an error the store is as
        it was (files the block wrote under new names aside: garbage for gc)."""

    @abstractmethod
    def check_writable(self, must_exist: bool) -> None:
        """Before a run writes anything: the store's place can be written (and, with
        ``must_exist``, holds something), or a clear error, so a bad location leaves nothing
        half-way."""

    @abstractmethod
    def contains(self, location: str) -> bool:
        """Whether the file at ``location`` (a path or URL) lies inside this store."""

    def read_json(self, relpath: str):
        """The JSON value of ``relpath``, None when it is absent or not readable JSON (a torn
        or foreign file counts as missing)."""
        import json

        try:
            return json.loads(self.read(relpath).decode("utf-8"))
        except StorageError:
            raise  # the store could not be reached: not the same as a missing file
        except (OSError, ValueError):
            return None

    def write_json(self, relpath: str, obj) -> None:
        """``replace`` with ``obj`` as indented, key-sorted JSON."""
        import json

        self.replace(relpath, json.dumps(obj, indent=1, sort_keys=True).encode())


def _absent_is_fine(function, path, exc_info) -> None:
    """rmtree's error handler: a file another remover took first is fine, anything else not."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


class LocalStoreIO(StoreIO):
    """``StoreIO`` on a local (or POSIX-mounted) directory."""

    def __init__(self, location: str | os.PathLike):
        # Absolute: a pipeline step that captures it may run in another working directory.
        super().__init__(os.path.abspath(location))
        self.root = Path(self.location)

    def where(self, relpath: str = "") -> str:
        return str(self.root / relpath) if relpath else str(self.root)

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    @staticmethod
    def _sync_dir(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def create_exclusive(self, relpath: str, data: bytes) -> None:
        path = self.root / relpath
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # fails with FileExistsError if another writer got there first
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._sync_dir(path.parent)

    def replace(self, relpath: str, data: bytes) -> None:
        path = self.root / relpath
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._sync_dir(path.parent)

    def read(self, relpath: str) -> bytes:
        return store_file(self.root, relpath).read_bytes()  # a planted link is refused

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).exists()

    def listdir(self, relpath: str) -> list[str]:
        d = self.root / relpath
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def usage(self, relpath: str) -> Usage | None:
        path = self.root / relpath
        try:
            st = path.lstat()
        except OSError:
            return None
        size, newest = (0 if path.is_dir() else st.st_size), st.st_mtime
        if path.is_dir() and not path.is_symlink():
            for p in path.rglob("*"):
                try:
                    sub = p.lstat()
                except OSError:
                    continue
                newest = max(newest, sub.st_mtime)
                if p.is_file():
                    size += sub.st_size
        return Usage(size, newest)

    def remove(self, relpath: str) -> None:
        path = self.root / relpath
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, onerror=_absent_is_fine)
        else:
            path.unlink(missing_ok=True)

    def get(self, relpaths: list[str], local_root: Path) -> None:
        for rel in relpaths:
            (local_root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store_file(self.root, rel), local_root / rel)

    def put(self, local_root: Path, relpaths: list[str]) -> None:
        for rel in relpaths:
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
            shutil.copyfile(local_root / rel, tmp)
            os.replace(tmp, target)

    @contextmanager
    def staged(self, fetch: Iterable[str] = ()) -> Iterator[Path]:
        yield self.root  # the store itself: its files are already local, nothing is copied

    def check_writable(self, must_exist: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            kind = "a file" if root.is_file() else describe_kind(root)
            raise ValueError(f"{root} is {kind}, not a store directory")
        if must_exist and not root.is_dir():
            raise FileNotFoundError(f"no store at {root}")
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            where = "store directory" if probe == root else "directory"
            raise PermissionError(f"{where} {probe} is not writable: the store cannot be written")

    def contains(self, location: str) -> bool:
        # A URL never names an existing local path, so only a local file can be inside.
        return (os.path.exists(location)
                and self.root.resolve() in Path(location).resolve().parents)


# botocore's and aiohttp's exceptions, by class name: s3fs passes these through untranslated,
# and naming them keeps botocore an optional import (the 's3' extra).
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
                "ClientOSError", "ProxyConnectionError", "ConnectionRefusedError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_RERUN = "rerun the same command then (a build or update reuses the shards it finished)"


def _endpoint(url: str) -> str:
    opts = storage_options(url).get("client_kwargs", {})
    return opts.get("endpoint_url") or f"the {scheme(url)}:// service"


def _names(e: BaseException) -> set[str]:
    """Class names of ``e``, its bases and the exceptions it was raised from."""
    out: set[str] = set()
    seen = 0
    while e is not None and seen < 8:
        out.update(c.__name__ for c in type(e).__mro__)
        e = e.__cause__ or e.__context__
        seen += 1
    return out


def storage_error(e: BaseException, url: str) -> StorageError | None:
    """The one-line ``StorageError`` an exception from the object-store client stands for, or
    None when it is not one of these (a missing object, a refused put: the caller's to read)."""
    names = _names(e)
    if names & _NO_CREDENTIALS:
        return StorageError(f"no credentials for {url}: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), then rerun")
    if names & _UNREACHABLE:
        return StorageError(f"cannot reach the object store at {_endpoint(url)} for {url}: "
                            "check DRESD_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) and that the "
                            f"server is up; {_RERUN}")
    return None


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """Calls to an object store inside the block fail with a one-line ``StorageError`` when
    the store cannot be reached or used (see ``storage_error``), any other error as it is."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        translated = storage_error(e, url)
        if translated is None:
            raise
        raise translated from e


def _reached(method):
    """``reaching`` around an ``ObjectStoreIO`` method."""
    import functools

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with reaching(self.url):
            return method(self, *args, **kwargs)

    return call


class ObjectStoreIO(StoreIO):
    """``StoreIO`` on a store at a URL (``s3://bucket/prefix``), through fsspec.

    ``create_exclusive`` is a conditional put: on S3 ``PutObject`` with ``If-None-Match: "*"``,
    which the service refuses (412) when the key exists, so of two writers exactly one creates a
    manifest. ``replace`` is a plain put: an object store shows the old or the new object, never
    a mix. A "directory" is a key prefix; its modification time is the newest ``LastModified``
    of the objects under it.
    """

    def __init__(self, location: str | os.PathLike):
        super().__init__(str(location).rstrip("/"))
        self.url = self.location
        self._fs = None
        self._root = None

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = filesystem(self.url)
        return self._fs

    def path(self, relpath: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return join(self._root, relpath)

    def where(self, relpath: str = "") -> str:
        return join(self.url, relpath)

    @_reached
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
                raise FileExistsError(self.where(relpath)) from None
            raise

    @_reached
    def replace(self, relpath: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(relpath), data)

    @_reached
    def read(self, relpath: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relpath))
        except FileNotFoundError:
            raise FileNotFoundError(self.where(relpath)) from None

    @_reached
    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    @_reached
    def listdir(self, relpath: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(relpath), detail=False)
        except FileNotFoundError:
            return []
        base = self.path(relpath).rstrip("/")
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if e.rstrip("/") != base)

    @_reached
    def usage(self, relpath: str) -> Usage | None:
        try:
            found = list(self.fs.find(self.path(relpath), detail=True).values())
        except FileNotFoundError:
            return None
        if not found:
            return None
        return Usage(sum(int(o.get("size") or 0) for o in found),
                     max(_modified(o) for o in found))

    @_reached
    def remove(self, relpath: str) -> None:
        try:
            self.fs.rm(self.path(relpath), recursive=True)
        except FileNotFoundError:
            pass

    @_reached
    def get(self, relpaths: list[str], local_root: Path) -> None:
        if not relpaths:
            return
        for rel in relpaths:
            (local_root / rel).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get([self.path(r) for r in relpaths], [str(local_root / r) for r in relpaths])

    @_reached
    def put(self, local_root: Path, relpaths: list[str]) -> None:
        if relpaths:
            self.fs.put([str(local_root / r) for r in relpaths],
                        [self.path(r) for r in relpaths])

    @_reached
    def check_writable(self, must_exist: bool) -> None:
        check_store_location(self.url)
        bucket = self.path("").split("/", 1)[0]
        try:
            self.fs.info(bucket)  # raises what keeps it from being read, unlike fs.exists
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: its bucket does not exist (or these "
                                    "credentials cannot see it); create it first") from None
        if must_exist and not self.listdir(""):
            raise FileNotFoundError(f"no store at {self.url}")

    def contains(self, location: str) -> bool:
        return str(location).startswith(self.url + "/")

    @contextmanager
    def staged(self, fetch: Iterable[str] = ()) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="dresd-stage-") as tmp:
            root = Path(tmp)
            fetch = list(dict.fromkeys(fetch))
            self.get(fetch, root)
            before = _snapshot(root)
            yield root
            after = _snapshot(root)
            changed = sorted(rel for rel, stamp in after.items()
                             if before.get(rel) != stamp and not is_scratch(rel))
            self.put(root, changed)
            for rel in fetch:
                if rel not in after:
                    self.remove(rel)


# What the functions of schemas and pipelines take as a store: its location or its StoreIO.
Store = str | os.PathLike | StoreIO


def _modified(info: dict) -> float:
    """An fsspec info dict's modification time, in seconds since the epoch."""
    when = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if when is None:
        return 0.0
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def store_io(location: str | os.PathLike | StoreIO) -> StoreIO:
    """The ``StoreIO`` of a store location: chosen here, once, by its form (a URL or a path).
    A ``StoreIO`` is returned as it is."""
    if isinstance(location, StoreIO):
        return location
    return ObjectStoreIO(location) if is_remote(location) else LocalStoreIO(location)


def describe_kind(path: str | os.PathLike) -> str:
    """What a path that is neither a regular file nor a directory is, in words."""
    mode = os.stat(path).st_mode
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def staged(store: str | os.PathLike | StoreIO, fetch: Iterable[str] = ()):
    """``store_io(store).staged(fetch)``: see ``StoreIO.staged``."""
    return store_io(store).staged(fetch)


def is_scratch(relpath: str) -> bool:
    """A temporary file or directory of a writer (``.name.*.tmp``, ``*.part``): never named by
    a manifest, never uploaded, garbage for gc once old."""
    name = relpath.rsplit("/", 1)[-1]
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".part")


# --- corpus files ---------------------------------------------------------------------------
# Read through fsspec whatever the location: a local path is fsspec's local filesystem.


def list_files(url: str, glob: str) -> list[str] | None:
    """Files under a directory matching ``glob``, or [url] when ``url`` is a file; None when
    nothing is there. Listed in the form given: URLs for a URL, paths for a path."""
    with reaching(url):
        return _list_files(url, glob)


def _list_files(url: str, glob: str) -> list[str] | None:
    fs, path = filesystem(url)
    proto = scheme(url)
    if fs.isdir(path):
        found = sorted(p for p in fs.glob(join(path, glob)) if fs.isfile(p))
        return [f"{proto}://{p}" if proto else p for p in found]
    if fs.isfile(path):
        return [str(url)]
    return None


def open_input(path: str):
    """A binary file object for reading a corpus file."""
    fs, p = filesystem(path)
    with reaching(path):
        return fs.open(p, "rb")


def file_size(path: str) -> int:
    fs, p = filesystem(path)
    with reaching(path):
        return int(fs.size(p))


def file_stamp(path: str) -> list:
    """What identifies a corpus file's version: its location, size, and its ETag (objects) or
    modification time."""
    fs, p = filesystem(path)
    with reaching(path):
        info = fs.info(p)
    version = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or
                                                          info.get("mtime") or "")
    return [p if not scheme(path) else str(path), int(info.get("size") or 0), str(version)]


def location_key(location: str) -> str:
    """A short digest naming a store location in local caches."""
    return hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
