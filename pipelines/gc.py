"""``dresd gc``: remove what no retained generation needs.

Garbage is: temporary files and directories (``.*.tmp*``, ``*.part``), shard directories and
transform/quantizer files that no retained manifest names (the shards of crashed runs and of
the loser of a race), journals of dead runs, and, with ``keep``, the manifests (and dead-letter
reports) of generations older than the newest ``keep``; the newest committed generation is
always kept.

Never removed: anything a retained manifest names, anything modified within ``grace_s`` (a run
that started while gc was looking), and, while any run is live (its journal heartbeat is
fresh), no unreferenced shard, transform or quantizer at all: it may be that run's output.
Old manifests go first, so a crash of gc never leaves a manifest naming a missing file.
A store at a URL follows the same rules on objects (pipelines.gc_remote).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.dead_letter import DEAD_LETTER_DIR, dead_letter_path
from pipelines.faults import maybe_fail
from pipelines.fit import INDEX_DIR, TRANSFORM_DIR
from pipelines.journal import JOURNAL_DIR, is_live, run_dirs
from schemas import list_generations, read_manifest
from schemas.commit import resolve_generation, update_current
from schemas.manifest import generation_path
from schemas.shard_io import SHARDS_DIR, shard_relpath
from schemas.storage import is_remote

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0


@dataclass
class GcReport:
    generation: int  # newest committed, always kept
    retained: list[int]
    removed: list[str] = field(default_factory=list)  # store-relative paths
    bytes: int = 0
    live_runs: int = 0
    kept_young: int = 0  # garbage left because it was modified within the grace period

    def summary(self, dry_run: bool) -> str:
        verb = "would remove" if dry_run else "removed"
        text = (f"generation {self.generation} is current; kept generation(s) "
                f"{', '.join(map(str, self.retained))}; {verb} {len(self.removed)} path(s), "
                f"{self.bytes / 2**20:.2f} MiB")
        if self.live_runs:
            text += (f"; {self.live_runs} run(s) in progress, so unreferenced shards were kept "
                     "(run gc again when they finish)")
        if self.kept_young:
            text += f"; {self.kept_young} path(s) younger than the grace period kept"
        return text


def _referenced(manifest_dict) -> set[str]:
    """Every store-relative path a manifest names (any object with a ``path``), and its
    parent directories."""
    out: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("path"), str):
                p = x["path"]
                out.add(p)
                parts = p.split("/")
                out.update("/".join(parts[:i]) for i in range(1, len(parts)))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(manifest_dict)
    for s in manifest_dict.get("shards", []):
        out.add(shard_relpath(s["shard_id"]))
    return out


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            try:
                newest = max(newest, p.lstat().st_mtime)
            except OSError:
                pass
    return newest


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _is_temp(name: str) -> bool:
    return (name.startswith(".") and ".tmp" in name) or name.endswith(".part")


def collect_garbage(store: str | os.PathLike, keep: int | None = None, dry_run: bool = False,
                    grace_s: float = DEFAULT_GRACE_S) -> GcReport:
    """Remove the store's garbage (see the module docstring); ``keep`` newest generations
    (None: all)."""
    if keep is not None and keep < 1:
        raise ValueError(f"--keep must be at least 1 (the current generation), not {keep}")
    if grace_s < 0:
        raise ValueError(f"--grace must be >= 0 seconds, not {grace_s}")
    if is_remote(store):
        from pipelines.gc_remote import collect_remote_garbage

        return collect_remote_garbage(str(store), keep, dry_run, grace_s)
    root = Path(store)
    if not root.is_dir():
        raise FileNotFoundError(f"no store at {store}")
    newest = resolve_generation(store)
    generations = [g for g in list_generations(store) if g <= newest]
    retained = generations[-keep:] if keep else generations
    newer = [g for g in list_generations(store) if g > newest]  # never under the protocol
    referenced: set[str] = set()
    for g in retained + newer:
        read_manifest(store, g)  # a retained manifest that does not load stops gc here
        referenced |= _referenced(json.loads(generation_path(store, g).read_text("utf-8")))

    now = time.time()
    live = [d for d in run_dirs(store) if is_live(d, now)]
    report = GcReport(generation=newest, retained=retained, live_runs=len(live))
    candidates: list[Path] = []  # in removal order
    candidates += [generation_path(store, g) for g in generations if g not in retained]
    candidates += [dead_letter_path(str(store), g) for g in generations if g not in retained]
    young: list[Path] = []  # subject to the grace period

    for d in run_dirs(store):
        if d not in live:
            young.append(d)
    if not live:  # dead-letter reports of runs that never committed
        young += [p for p in sorted((root / DEAD_LETTER_DIR).glob("gen-*.parquet"))
                  if p.stem[4:].isdigit() and int(p.stem[4:]) > max(newest, *newer, 0)]
    for top in (SHARDS_DIR, TRANSFORM_DIR, INDEX_DIR):
        d = root / top
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            rel = f"{top}/{p.name}"
            if _is_temp(p.name):
                young.append(p)
            elif rel not in referenced and not live:
                young.append(p)
    for top in (".", "manifests", DEAD_LETTER_DIR, JOURNAL_DIR):
        d = root / top
        if d.is_dir():
            young += [p for p in sorted(d.iterdir()) if _is_temp(p.name)]
    for p in young:
        if now - _newest_mtime(p) < grace_s:
            report.kept_young += 1
        else:
            candidates.append(p)

    if not dry_run:
        update_current(store, newest)  # the hint never names a generation removed below
    removed = 0
    for p in candidates:
        if not p.exists() and not p.is_symlink():
            continue
        report.removed.append(p.relative_to(root).as_posix())
        report.bytes += _size(p)
        if dry_run:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed += 1
        if removed == 1:
            maybe_fail("during_gc")
    log.info("gc %s: %s", store, report.summary(dry_run))
    return report
