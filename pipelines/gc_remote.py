"""``dresd gc`` on a store at a URL (s3://...): the rules of pipelines.gc, on objects.

An object store has no directories and no mtimes to touch: a "directory" here is a key prefix,
its age is the newest ``LastModified`` of the objects under it, and a run is live while its
journal's ``run.json`` was rewritten (the remote heartbeat) within ``LIVE_S`` and it has no
``ended`` marker. The launcher's process cannot be probed from here, so a run killed without
its marker counts as live until its heartbeat is ``LIVE_S`` old. The order is the local one:
``CURRENT`` repaired, old manifests first, then the files only they named, so a crash of gc
never leaves a retained manifest naming a missing object.
"""

from __future__ import annotations

import json
import logging
import time

from pipelines.dead_letter import DEAD_LETTER_DIR, dead_letter_relpath
from pipelines.faults import maybe_fail
from pipelines.fit import INDEX_DIR, TRANSFORM_DIR
from pipelines.journal import remote_is_live, remote_runs
from schemas import read_manifest
from schemas.commit import listed_generations, manifest_relpath, resolve_generation, update_current
from schemas.shard_io import SHARDS_DIR
from schemas.storage import ObjectStoreIO

log = logging.getLogger(__name__)


def _stamp(info: dict) -> float:
    when = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if when is None:
        return 0.0
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def _objects(io: ObjectStoreIO, relpath: str) -> list[dict]:
    """Every object at or under ``relpath`` (fsspec info dicts)."""
    try:
        found = io.fs.find(io.path(relpath), detail=True)
    except FileNotFoundError:
        return []
    return list(found.values())


def collect_remote_garbage(store: str, keep: int | None, dry_run: bool, grace_s: float):
    from pipelines.gc import GcReport, _referenced

    io = ObjectStoreIO(store)
    newest = resolve_generation(store, io)
    listed = listed_generations(io)
    generations = [g for g in listed if g <= newest]
    retained = generations[-keep:] if keep else generations
    newer = [g for g in listed if g > newest]
    referenced: set[str] = set()
    for g in retained + newer:
        read_manifest(store, g)  # a retained manifest that does not load stops gc here
        referenced |= _referenced(json.loads(io.read(manifest_relpath(g)).decode("utf-8")))

    now = time.time()
    runs = remote_runs(io)
    live = [run for run in runs if remote_is_live(io, run, now)]
    report = GcReport(generation=newest, retained=retained, live_runs=len(live))
    candidates = [manifest_relpath(g) for g in generations if g not in retained]
    candidates += [dead_letter_relpath(g) for g in generations if g not in retained]
    young = [r for r in runs if r not in live]
    if not live:  # dead-letter reports of runs that never committed
        last = max(newest, *newer, 0)
        for name in io.listdir(DEAD_LETTER_DIR):
            stem = name.removesuffix(".parquet")
            if stem.startswith("gen-") and stem[4:].isdigit() and int(stem[4:]) > last:
                young.append(f"{DEAD_LETTER_DIR}/{name}")
        for top in (SHARDS_DIR, TRANSFORM_DIR, INDEX_DIR):
            young += [f"{top}/{n}" for n in io.listdir(top) if f"{top}/{n}" not in referenced]
    sizes: dict[str, int] = {}
    for rel in young:
        objs = _objects(io, rel)
        sizes[rel] = sum(int(o.get("size") or 0) for o in objs)
        if objs and now - max(_stamp(o) for o in objs) < grace_s:
            report.kept_young += 1
        else:
            candidates.append(rel)

    if not dry_run:
        update_current(store, newest, io)  # the hint never names a generation removed below
    removed = 0
    for rel in candidates:
        objs = _objects(io, rel)
        if not objs:
            continue
        report.removed.append(rel)
        report.bytes += sizes.get(rel) or sum(int(o.get("size") or 0) for o in objs)
        if dry_run:
            continue
        io.remove(rel)
        removed += 1
        if removed == 1:
            maybe_fail("during_gc")
    log.info("gc %s: %s", store, report.summary(dry_run))
    return report
