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

Every file is written whole through the store's ``StoreIO`` (schemas.storage): a local
directory and a prefix on object storage take the same calls. The heartbeat rewrites
``run.json``, and a dead run's shards are checksummed through ``StoreIO.staged`` (on object
storage fetched into a staging directory first) before they are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.documents import FilledShard
from pipelines.faults import maybe_fail
from schemas import FileRef, IndexSpec, ShardInfo, TransformSpec
from schemas.errors import StorageError
from schemas.manifest import make_file_ref
from schemas.shard_io import read_docs, shard_relpath
from schemas.storage import Store, StoreIO, file_stamp, store_io

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


class QuantizerChangedError(RuntimeError):
    """A shard's lists were filled with another quantizer than the one the run would commit."""


def check_filled_with(filled: FilledShard, fitted) -> None:
    """Raise QuantizerChangedError unless ``filled``'s lists were written with ``fitted``'s
    quantizer. On a cluster, a worker lost after the quantizer was trained can make the engine
    train it again from the re-encoded shards (another sample, another quantizer) and fill the
    remaining shards with it; committing shards of both would make part of the index
    unsearchable. The run stops instead; its rerun adopts the recorded quantizer and the shards
    filled with it, and encodes the rest again."""
    want = fitted.index_spec.quantizer.sha256
    if filled.quantizer_sha256 != want:
        raise QuantizerChangedError(
            f"shard {filled.info.shard_id} was filled with quantizer "
            f"{filled.quantizer_sha256[:12]}, but this run's quantizer is now {want[:12]}: the "
            "engine trained it again after a worker was lost. Nothing was committed; rerun the "
            "same command: it keeps the shards filled with the recorded quantizer and redoes "
            "the rest")


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


def _process_identity() -> dict:
    """Where this process's pid means something: host name, boot and pid namespace. Two
    containers may share a host name but not a pid namespace, so a pid is probed only where
    all three match (None where the system does not say: never probed)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot = pidns = None
    return {"host": socket.gethostname(), "boot": boot, "pidns": pidns}


def _process_gone(info: dict | None) -> bool:
    """The run's launcher ran in this host's boot and pid namespace, and its process no longer
    exists. Anything else (another machine, another container, an older journal without the
    identity) is left to the heartbeat."""
    here = _process_identity()
    if (not info or not isinstance(info.get("pid"), int) or here["pidns"] is None
            or any(info.get(k) != v for k, v in here.items())):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def run_dirs(store: Store) -> list[str]:
    """Store-relative paths of the run journals (``journal/run-...``), sorted."""
    io = store_io(store)
    return [f"{JOURNAL_DIR}/{n}" for n in io.listdir(JOURNAL_DIR) if n.startswith("run-")]


def run_info(store: Store, run: str) -> dict | None:
    """The ``run.json`` of a run journal; None when it is absent or unreadable."""
    info = store_io(store).read_json(f"{run}/{RUN_FILE}")
    return info if isinstance(info, dict) else None


def is_live(store: Store, run: str, now: float | None = None) -> bool:
    """A run is live while its heartbeat (the modification time of its ``run.json``) is fresh,
    it has not ended, and, when its launcher ran on this host, that process exists."""
    io = store_io(store)
    if io.exists(f"{run}/{ENDED_FILE}"):
        return False
    beat = io.usage(f"{run}/{RUN_FILE}")
    if beat is None:
        return False
    return ((now or time.time()) - beat.newest < LIVE_S
            and not _process_gone(run_info(io, run)))


def recorded_shards(store: Store, run: str) -> list[dict]:
    """The shard records of a run journal (unreadable ones skipped)."""
    io = store_io(store)
    out = []
    for name in io.listdir(run):
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        rec = io.read_json(f"{run}/{name}")
        try:
            rec["shard"] = ShardInfo.from_dict(rec["shard"])
        except (KeyError, TypeError):
            continue
        out.append(rec)
    return out


def _intact(io: StoreIO, refs, shard_id: str | None = None):
    """Whether ``refs`` are in the store as they were recorded (checksummed; on object storage
    fetched into a staging directory first): False if any is missing or differs; True, or with
    ``shard_id`` the set of that shard's document ids, if all match."""
    refs = list(refs)
    if not refs:
        return False
    try:
        with io.staged([r.path for r in refs]) as root:
            if any(make_file_ref(root, r.path) != r for r in refs):
                return False
            if shard_id is None:
                return True
            return set(read_docs(root, shard_id).column("doc_id").to_pylist())
    except StorageError:
        raise  # the store could not be reached: that says nothing about the files
    except (OSError, ValueError):
        return False


class RunJournal:
    """One run's journal directory. Picklable (pipeline steps take it); the heartbeat thread
    lives only in the launcher."""

    def __init__(self, store: Store, kind: str, parent: int, key: str):
        self.io = store_io(store)
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
    def store(self) -> StoreIO:
        return self.io

    @property
    def relpath(self) -> str:
        return f"{JOURNAL_DIR}/{self.name}"

    def _put_json(self, name: str, obj) -> None:
        self.io.write_json(f"{self.relpath}/{name}", obj)

    def _info(self) -> dict:
        return {"kind": self.kind, "parent": self.parent, "key": self.key,
                **_process_identity(), "pid": os.getpid(), "started": self._started}

    # --- launcher side ---------------------------------------------------------------------

    def start(self) -> RunJournal:
        """Write ``run.json`` (the run's first write: an unwritable store fails here, before
        anything is encoded) and start the heartbeat."""
        self._started = time.time()
        self._put_json(RUN_FILE, self._info())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="dresd-heartbeat")
        self._thread.start()
        return self

    def _beat(self) -> None:
        # Rewriting run.json is the heartbeat: an object's modification time changes only when
        # it is rewritten, and a local file's this way too. A failed beat (a full disk, a
        # storage outage) is tried again at the next one: a heartbeat that stopped for good
        # would let gc take this run's shards for a dead run's once it is LIVE_S old.
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._put_json(RUN_FILE, self._info())
            except OSError as e:
                log.warning("run heartbeat not written (%s); trying again in %.0f s", e,
                            HEARTBEAT_S)

    def stop(self, ended: bool) -> None:
        """Stop the heartbeat; ``ended`` marks a run that stops without committing as dead."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = None
        if ended:  # best effort: it runs while another error is on its way to the user
            try:
                if self.io.exists(f"{self.relpath}/{RUN_FILE}"):
                    self.io.replace(f"{self.relpath}/{ENDED_FILE}", b"")
            except OSError:
                pass

    def read_result(self) -> RunResult:
        d = self.io.read_json(f"{self.relpath}/{RESULT_FILE}")
        if not isinstance(d, dict):
            raise RuntimeError("the pipeline finished without writing its result "
                               f"({self.io.where(f'{self.relpath}/{RESULT_FILE}')})")
        return RunResult(
            shards=tuple(ShardInfo.from_dict(s) for s in d["shards"]),
            transform=_refs(TransformSpec, d["transform"]) if d["transform"] else None,
            index=_refs(IndexSpec, d["index"]) if d["index"] else None,
        )

    def adopt(self, transform: TransformSpec | None = None, index: IndexSpec | None = None,
              taken: set[str] | None = None) -> Adopted:
        """Take over the verified shards (and, for a build without ``transform``, the fitted
        keys) of dead runs of the same command; their records move into this run's journal.
        Every file of a candidate is checksummed again first (cheaper than encoding it)."""
        out = Adopted(transform=transform, index=index)
        taken = set(taken or ())
        for run in run_dirs(self.io):
            info = run_info(self.io, run)
            if (run == self.relpath or info is None or info.get("key") != self.key
                    or info.get("parent") != self.parent or is_live(self.io, run)):
                continue
            if out.transform is None:
                fitted = self._verified_fitted(run)
                if fitted is None:  # nothing reusable: its files are garbage for gc
                    self.io.remove(run)
                    continue
                out.transform, out.index = fitted
                self._put_json(FITTED_FILE, self.io.read_json(f"{run}/{FITTED_FILE}"))
            for rec in recorded_shards(self.io, run):
                info = rec["shard"]
                if (rec.get("transform") != out.transform.file.sha256
                        or rec.get("quantizer") != out.index.quantizer.sha256):
                    continue
                doc_ids = _intact(self.io, info.files(), info.shard_id)
                if not doc_ids or len(doc_ids) != info.num_docs or doc_ids & taken:
                    continue
                taken |= doc_ids
                out.shards.append(info)
                self._record(info, rec["transform"], rec["quantizer"])
            self.io.remove(run)
        if out.shards:
            log.info("reusing %d shard(s), %d documents, written by an earlier run of this "
                     "command", len(out.shards), sum(s.num_docs for s in out.shards))
        return out

    def _verified_fitted(self, run: str):
        fitted = self.io.read_json(f"{run}/{FITTED_FILE}")
        try:
            transform = _refs(TransformSpec, fitted["transform"])
            index = _refs(IndexSpec, fitted["index"])
        except (KeyError, TypeError):
            return None
        if not _intact(self.io, [transform.file, index.quantizer]):
            return None
        return transform, index

    def finish(self, committed: tuple[ShardInfo, ...]) -> None:
        """After a successful commit: remove the shards this run recorded that the commit does
        not name (a retried bundle's), then the run's journal directory."""
        self.stop(ended=False)
        named = {s.shard_id for s in committed}
        names = self.io.listdir(self.relpath)
        extra = [n[len("shard-"):-len(".json")] for n in names
                 if n.startswith("shard-") and n.endswith(".json")]
        for i, sid in enumerate(s for s in extra if s not in named):
            self.io.remove(shard_relpath(sid))
            if i == 0:
                maybe_fail("during_cleanup")
        # The shard records and run.json go last: until then a rerun of a build can tell that
        # this run's commit happened (pipelines.build.completed_earlier).
        for i, name in enumerate(n for n in names if n != RUN_FILE
                                 and not n.startswith("shard-")):
            self.io.remove(f"{self.relpath}/{name}")
            if i == 0:
                maybe_fail("during_cleanup")
        self.io.remove(self.relpath)

    # --- pipeline side ---------------------------------------------------------------------

    def _record(self, info: ShardInfo, transform_sha: str, quantizer_sha: str) -> None:
        self._put_json(f"shard-{info.shard_id}.json",
                       {"shard": asdict(info), "transform": transform_sha,
                        "quantizer": quantizer_sha})

    def record_shard(self, filled: FilledShard, fitted) -> FilledShard:
        maybe_fail("after_index_fill")
        check_filled_with(filled, fitted)
        self._record(filled.info, fitted.transform_spec.file.sha256, filled.quantizer_sha256)
        maybe_fail("after_shard_record")
        return filled

    def record_fitted(self, fitted) -> None:
        if fitted is None:
            return
        self._put_json(FITTED_FILE, {"transform": asdict(fitted.transform_spec),
                                     "index": asdict(fitted.index_spec)})

    def write_result(self, filled: list[FilledShard], fitted) -> int:
        for f in filled:
            check_filled_with(f, fitted)
        shards = [f.info for f in filled]
        self._put_json(RESULT_FILE, {
            "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.shard_id)],
            "transform": asdict(fitted.transform_spec) if fitted else None,
            "index": asdict(fitted.index_spec) if fitted else None,
        })
        return len(shards)
