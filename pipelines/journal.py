"""The run journal: what a build, update or compaction has written so far, under ``journal/``.

Every run gets a directory ``journal/run-<parent>-<key>-<id>/`` before it writes anything:

- ``run.json``: kind, parent generation and the run key (a digest of the command: kind, parent,
  corpus files with sizes and modification times, configuration, model). Its modification time
  is a heartbeat, refreshed while the launcher runs, so ``dresd gc`` leaves a live run alone;
- ``ended``: written when the launcher stops without committing (an exception);
- ``fitted.json``: a build's transform and quantizer, once written;
- ``shard-<id>.json``: one record per shard whose files are all written and checksummed (the
  ShardInfo, plus the transform and quantizer it was encoded with);
- ``result.json``: the run's output, written once by the pipeline's last step: the fitted keys
  and exactly the shards of successful bundles (a retried bundle's first shard is recorded
  above but not here). The launcher commits the manifest from it.

After a successful commit the launcher removes its directory and the shards it recorded that
the commit does not name. A rerun of the same command (same key and parent) after a crash
adopts the records of a dead run: every file of a recorded shard is checksummed again and a
shard is reused only if it was encoded with the transform and quantizer this run uses and none
of its documents is already taken; its documents are then not encoded again.

On a store at a URL (schemas.storage) the same files are objects under ``journal/<run>/``,
written whole by plain puts; the heartbeat rewrites ``run.json`` (an object's modification time
changes only then), and a dead run's shards are fetched into a staging directory to be
checksummed before they are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.faults import maybe_fail
from schemas import FileRef, IndexSpec, ShardInfo, TransformSpec
from schemas.commit import LocalStoreIO
from schemas.manifest import make_file_ref
from schemas.shard_io import read_docs, shard_relpath
from schemas.storage import ObjectStoreIO, file_stamp, is_remote, staged

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
RUN_FILE = "run.json"
ENDED_FILE = "ended"
FITTED_FILE = "fitted.json"
RESULT_FILE = "result.json"
HEARTBEAT_S = 30.0
LIVE_S = 120.0  # a run whose heartbeat is older than this (or that has ended) is dead


def _refs(cls, d: dict):
    """A dataclass from its asdict() form, FileRef fields rebuilt."""
    return cls(**{k: FileRef(**v) if isinstance(v, dict) and "sha256" in v else v
                  for k, v in d.items()})


def _write_json(path: Path, obj) -> None:
    """Whole or not at all: the commit protocol's own replace (temp file, fsync, rename)."""
    LocalStoreIO(path.parent).replace(path.name, json.dumps(obj, indent=1, sort_keys=True).encode())


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def run_key(kind: str, parent: int, files: list[str], settings: dict, model: str) -> str:
    """A digest of the command: the same command on the same inputs gets the same key."""
    h = hashlib.sha256()
    stats = [file_stamp(f) for f in sorted(files)]
    h.update(json.dumps([kind, parent, stats, settings, model], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:16]


def config_settings(config) -> dict:
    """The fields of a BuildConfig that change what is encoded (not progress bars or notes)."""
    d = dataclasses.asdict(config)
    for name in ("progress", "note", "device", "batch_tokens"):
        d.pop(name, None)
    return d


@dataclass(frozen=True)
class RunResult:
    shards: tuple[ShardInfo, ...]
    transform: TransformSpec | None
    index: IndexSpec | None


@dataclass
class Adopted:
    """What a rerun takes over from dead runs of the same command."""

    shards: list[ShardInfo] = dataclasses.field(default_factory=list)
    transform: TransformSpec | None = None
    index: IndexSpec | None = None


def _process_gone(info: dict | None) -> bool:
    """The run's launcher ran on this host and its process no longer exists."""
    if not info or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def is_live(run_dir: Path, now: float | None = None) -> bool:
    """A run is live while its heartbeat is fresh, it has not ended, and (on this host) its
    launcher process exists."""
    try:
        if (run_dir / ENDED_FILE).exists():
            return False
        beat = (run_dir / RUN_FILE).stat().st_mtime
    except OSError:
        return False
    return (now or time.time()) - beat < LIVE_S and not _process_gone(run_info(run_dir))


def run_dirs(store: str | os.PathLike) -> list[Path]:
    d = Path(store) / JOURNAL_DIR
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("run-")) \
        if d.is_dir() else []


def run_info(run_dir: Path) -> dict | None:
    try:
        info = _read_json(run_dir / RUN_FILE)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def recorded_shards(run_dir: Path) -> list[dict]:
    """The shard records of a run directory (unreadable ones skipped)."""
    out = []
    for p in sorted(run_dir.glob("shard-*.json")):
        try:
            rec = _read_json(p)
            rec["shard"] = _refs(ShardInfo, rec["shard"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(rec)
    return out


def remote_runs(io: ObjectStoreIO) -> list[str]:
    """Store-relative prefixes of the run journals of a store at a URL."""
    return [f"{JOURNAL_DIR}/{n}" for n in io.listdir(JOURNAL_DIR) if n.startswith("run-")]


def _remote_json(io: ObjectStoreIO, relpath: str):
    try:
        return json.loads(io.read(relpath).decode("utf-8"))
    except (OSError, ValueError):
        return None


def remote_is_live(io: ObjectStoreIO, run: str, now: float | None = None) -> bool:
    """``is_live`` for a run journal on object storage: its ``run.json`` was rewritten (the
    heartbeat) within LIVE_S and it has no ``ended`` marker. Its launcher's process cannot be
    probed from here."""
    try:
        beat = io.fs.info(io.path(f"{run}/{RUN_FILE}"))
    except FileNotFoundError:
        return False
    if io.exists(f"{run}/{ENDED_FILE}"):
        return False
    when = beat.get("LastModified") or beat.get("mtime")
    stamp = when.timestamp() if hasattr(when, "timestamp") else float(when or 0)
    return (now or time.time()) - stamp < LIVE_S


def remote_recorded(io: ObjectStoreIO, run: str) -> list[dict]:
    """``recorded_shards`` of a run journal on object storage."""
    out = []
    for name in io.listdir(run):
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        rec = _remote_json(io, f"{run}/{name}")
        try:
            rec["shard"] = _refs(ShardInfo, rec["shard"])
        except (KeyError, TypeError):
            continue
        out.append(rec)
    return out


def _staged_ok(store: str, refs, shard_id: str | None = None):
    """Fetch ``refs`` from a remote store and checksum them: False if any is missing or
    differs; True, or with ``shard_id`` the set of that shard's document ids, if all match."""
    refs = list(refs)
    try:
        with staged(store, [r.path for r in refs]) as root:
            if any(make_file_ref(root, r.path) != r for r in refs):
                return False
            if shard_id is None:
                return True
            return set(read_docs(root, shard_id).column("doc_id").to_pylist())
    except (OSError, ValueError):
        return False


class RunJournal:
    """One run's journal directory. Picklable (pipeline steps take it); the heartbeat thread
    lives only in the launcher."""

    def __init__(self, store: str, kind: str, parent: int, key: str):
        self.store = str(store)
        # On a remote store the journal's files are objects under journal/<name>/ in it,
        # written whole by plain puts; nothing local is shared with the workers.
        self.remote = is_remote(self.store)
        self._started = 0.0
        self.kind = kind
        self.parent = parent
        self.key = key
        self.name = f"run-{parent:06d}-{key}-{uuid.uuid4().hex[:8]}"
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_thread")}

    def __setstate__(self, state):
        self.__dict__.update(state, _stop=None, _thread=None)

    @property
    def dir(self) -> Path:
        return Path(self.store) / JOURNAL_DIR / self.name

    @property
    def relpath(self) -> str:
        return f"{JOURNAL_DIR}/{self.name}"

    def _put_json(self, name: str, obj) -> None:
        if self.remote:
            ObjectStoreIO(self.store).replace(
                f"{self.relpath}/{name}", json.dumps(obj, indent=1, sort_keys=True).encode())
        else:
            _write_json(self.dir / name, obj)

    def _info(self) -> dict:
        return {"kind": self.kind, "parent": self.parent, "key": self.key,
                "host": socket.gethostname(), "pid": os.getpid(), "started": self._started}

    # --- launcher side ---------------------------------------------------------------------

    def start(self) -> RunJournal:
        """Create the directory (the run's first write: an unwritable store fails here, before
        anything is encoded) and start the heartbeat."""
        self._started = time.time()
        if not self.remote:
            self.dir.mkdir(parents=True)
        self._put_json(RUN_FILE, self._info())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="dresd-heartbeat")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self.remote:  # an object's modification time changes only when rewritten
                    self._put_json(RUN_FILE, self._info())
                else:
                    os.utime(self.dir / RUN_FILE)
            except OSError:
                return

    def stop(self, ended: bool) -> None:
        """Stop the heartbeat; ``ended`` marks a run that stops without committing as dead."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = None
        if ended and self.remote:
            try:
                ObjectStoreIO(self.store).replace(f"{self.relpath}/{ENDED_FILE}", b"")
            except OSError:
                pass
        elif ended and self.dir.is_dir():
            try:
                (self.dir / ENDED_FILE).write_text("")
            except OSError:
                pass

    def read_result(self) -> RunResult:
        if self.remote:
            try:
                d = json.loads(ObjectStoreIO(self.store).read(f"{self.relpath}/{RESULT_FILE}"))
            except FileNotFoundError as e:
                raise RuntimeError(f"the pipeline finished without writing its result ({e})") \
                    from None
        else:
            path = self.dir / RESULT_FILE
            if not path.is_file():
                raise RuntimeError(f"the pipeline finished without writing its result ({path})")
            d = _read_json(path)
        return RunResult(
            shards=tuple(_refs(ShardInfo, s) for s in d["shards"]),
            transform=_refs(TransformSpec, d["transform"]) if d["transform"] else None,
            index=_refs(IndexSpec, d["index"]) if d["index"] else None,
        )

    def adopt(self, transform: TransformSpec | None = None, index: IndexSpec | None = None,
              taken: set[str] | None = None) -> Adopted:
        """Take over the verified shards (and, for a build without ``transform``, the fitted
        keys) of dead runs of the same command; their records move into this run's journal."""
        out = Adopted(transform=transform, index=index)
        taken = set(taken or ())
        if self.remote:
            return self._adopt_remote(out, taken)
        for d in run_dirs(self.store):
            info = run_info(d)
            if (d == self.dir or info is None or info.get("key") != self.key
                    or info.get("parent") != self.parent or is_live(d)):
                continue
            if out.transform is None:
                fitted = self._verified_fitted(d)
                if fitted is None:  # nothing reusable: its files are garbage for gc
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                out.transform, out.index = fitted
                _write_json(self.dir / FITTED_FILE, _read_json(d / FITTED_FILE))
            for rec in recorded_shards(d):
                info = rec["shard"]
                if (rec.get("transform") != out.transform.file.sha256
                        or rec.get("quantizer") != out.index.quantizer.sha256
                        or not self._intact(info)):
                    continue
                doc_ids = set(read_docs(self.store, info.shard_id).column("doc_id").to_pylist())
                if len(doc_ids) != info.num_docs or doc_ids & taken:
                    continue
                taken |= doc_ids
                out.shards.append(info)
                self._record(info, rec["transform"], rec["quantizer"])
            shutil.rmtree(d, ignore_errors=True)
        if out.shards:
            log.info("reusing %d shard(s), %d documents, written by an earlier run of this "
                     "command", len(out.shards), sum(s.num_docs for s in out.shards))
        return out

    def _adopt_remote(self, out: Adopted, taken: set[str]) -> Adopted:
        """``adopt`` on a store at a URL: the same rules, each candidate's files fetched into a
        local staging directory to be checksummed (cheaper than encoding them again)."""
        io = ObjectStoreIO(self.store)
        for run in remote_runs(io):
            info = _remote_json(io, f"{run}/{RUN_FILE}")
            if (run == self.relpath or not isinstance(info, dict)
                    or info.get("key") != self.key or info.get("parent") != self.parent
                    or remote_is_live(io, run)):
                continue
            if out.transform is None:
                fitted = _remote_json(io, f"{run}/{FITTED_FILE}")
                try:
                    transform = _refs(TransformSpec, fitted["transform"])
                    index = _refs(IndexSpec, fitted["index"])
                except (KeyError, TypeError):
                    transform = index = None
                if transform is None or not _staged_ok(self.store,
                                                       [transform.file, index.quantizer]):
                    io.remove(run)  # nothing reusable: its files are garbage for gc
                    continue
                out.transform, out.index = transform, index
                self._put_json(FITTED_FILE, fitted)
            for rec in remote_recorded(io, run):
                info = rec["shard"]
                if (rec.get("transform") != out.transform.file.sha256
                        or rec.get("quantizer") != out.index.quantizer.sha256):
                    continue
                doc_ids = _staged_ok(self.store, info.files(), info.shard_id)
                if not doc_ids or len(doc_ids) != info.num_docs or doc_ids & taken:
                    continue
                taken |= doc_ids
                out.shards.append(info)
                self._record(info, rec["transform"], rec["quantizer"])
            io.remove(run)
        if out.shards:
            log.info("reusing %d shard(s), %d documents, written by an earlier run of this "
                     "command", len(out.shards), sum(s.num_docs for s in out.shards))
        return out

    def _verified_fitted(self, d: Path):
        try:
            f = _read_json(d / FITTED_FILE)
            transform, index = _refs(TransformSpec, f["transform"]), _refs(IndexSpec, f["index"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for ref in (transform.file, index.quantizer):
            if not self._ref_ok(ref):
                return None
        return transform, index

    def _ref_ok(self, ref: FileRef) -> bool:
        try:
            return make_file_ref(self.store, ref.path) == ref
        except (OSError, ValueError):
            return False

    def _intact(self, info: ShardInfo) -> bool:
        refs = [v for v in (getattr(info, f.name) for f in dataclasses.fields(info))
                if isinstance(v, FileRef)]
        return bool(refs) and all(self._ref_ok(r) for r in refs)

    def finish(self, committed: tuple[ShardInfo, ...]) -> None:
        """After a successful commit: remove the shards this run recorded that the commit does
        not name (a retried bundle's), then the run's journal directory."""
        self.stop(ended=False)
        named = {s.shard_id for s in committed}
        if self.remote:
            self._finish_remote(named)
            return
        extra = [r["shard"].shard_id for r in recorded_shards(self.dir)
                 if r["shard"].shard_id not in named]
        for i, sid in enumerate(extra):
            shutil.rmtree(Path(self.store) / shard_relpath(sid), ignore_errors=True)
            if i == 0:
                maybe_fail("during_cleanup")
        # The shard records and run.json go last: until then a rerun of a build can tell that
        # this run's commit happened (pipelines.build._completed_earlier).
        files = sorted(self.dir.iterdir()) if self.dir.is_dir() else []
        for i, p in enumerate(f for f in files if f.name != RUN_FILE
                              and not f.name.startswith("shard-")):
            p.unlink(missing_ok=True)
            if i == 0:
                maybe_fail("during_cleanup")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _finish_remote(self, named: set[str]) -> None:
        """``finish`` on object storage, in the local order: extra shards, then the run's
        other files, the shard records and run.json last (see ``finish``)."""
        io = ObjectStoreIO(self.store)
        names = io.listdir(self.relpath)
        extra = [n[len("shard-"):-len(".json")] for n in names
                 if n.startswith("shard-") and n.endswith(".json")]
        for i, sid in enumerate(s for s in extra if s not in named):
            io.remove(shard_relpath(sid))
            if i == 0:
                maybe_fail("during_cleanup")
        for i, name in enumerate(n for n in names if n != RUN_FILE
                                 and not n.startswith("shard-")):
            io.remove(f"{self.relpath}/{name}")
            if i == 0:
                maybe_fail("during_cleanup")
        io.remove(self.relpath)

    # --- pipeline side ---------------------------------------------------------------------

    def _record(self, info: ShardInfo, transform_sha: str, quantizer_sha: str) -> None:
        self._put_json(f"shard-{info.shard_id}.json",
                       {"shard": asdict(info), "transform": transform_sha,
                        "quantizer": quantizer_sha})

    def record_shard(self, info: ShardInfo, fitted) -> ShardInfo:
        maybe_fail("after_index_fill")
        self._record(info, fitted.transform_spec.file.sha256,
                     fitted.index_spec.quantizer.sha256)
        maybe_fail("after_shard_record")
        return info

    def record_fitted(self, fitted) -> None:
        if fitted is None:
            return
        self._put_json(FITTED_FILE, {"transform": asdict(fitted.transform_spec),
                                     "index": asdict(fitted.index_spec)})

    def write_result(self, shards: list[ShardInfo], fitted) -> int:
        self._put_json(RESULT_FILE, {
            "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.shard_id)],
            "transform": asdict(fitted.transform_spec) if fitted else None,
            "index": asdict(fitted.index_spec) if fitted else None,
        })
        return len(shards)
