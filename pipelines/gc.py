"""``dresd gc``: remove what no retained generation needs.

Garbage is: temporary files and directories (``.*.tmp*``, ``*.part``), shard directories and
transform/quantizer files that no retained manifest names (the shards of crashed runs and of
the loser of a race), the inverted lists a re-index replaced, the key archive's fragments and
versions that no retained manifest names (with the Lance transaction files of those versions),
journals of dead runs, and, with ``keep``, the manifests (and dead-letter reports) of generations
older than the newest ``keep``; the newest committed generation is always kept.

Never removed: anything a retained manifest names, anything modified within ``grace_s`` (a run
that started while gc was looking), and, while any run is live (its journal heartbeat is
fresh), no unreferenced shard, transform or quantizer at all: it may be that run's output.
Old manifests go first, so a crash of gc never leaves a manifest naming a missing file.
A store at a URL follows the same rules on objects, through the same ``StoreIO`` calls: a
"directory" there is a key prefix and its age the newest ``LastModified`` under it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field

from pipelines.dead_letter import DEAD_LETTER_DIR, dead_letter_relpath
from pipelines.faults import maybe_fail
from pipelines.fit import INDEX_DIR, TRANSFORM_DIR
from pipelines.journal import JOURNAL_DIR, is_live, run_dirs
from schemas import list_generations, read_manifest
from schemas.archive import version_of
from schemas.commit import manifest_relpath, resolve_generation, update_current
from schemas.layout import (
    ARCHIVE_DATA_DIR,
    ARCHIVE_TRANSACTIONS_DIR,
    ARCHIVE_VERSIONS_DIR,
    MANIFEST_DIR,
)
from schemas.shard_io import SHARDS_DIR, shard_relpath
from schemas.storage import Store, is_scratch, store_io

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


_TRANSACTION = re.compile(rb"[0-9]+-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.txn")


def _unnamed_transactions(io, referenced: set[str]) -> list[str]:
    """Lance's transaction files that no retained archive version's manifest names (each
    version's manifest records the name of the transaction that made it). When a retained one
    names none (a Lance that records them elsewhere), nothing is removed."""
    named: set[str] = set()
    for rel in referenced:
        if rel.startswith(f"{ARCHIVE_VERSIONS_DIR}/") and rel.endswith(".manifest"):
            found = _TRANSACTION.findall(io.read(rel))
            if not found:
                return []
            named.update(n.decode() for n in found)
    return [f"{ARCHIVE_TRANSACTIONS_DIR}/{name}" for name in io.listdir(ARCHIVE_TRANSACTIONS_DIR)
            if name.endswith(".txn") and name not in named]


def collect_garbage(store: Store, keep: int | None = None, dry_run: bool = False,
                    grace_s: float = DEFAULT_GRACE_S) -> GcReport:
    """Remove the store's garbage (see the module docstring); ``keep`` newest generations
    (None: all)."""
    if keep is not None and keep < 1:
        raise ValueError(f"--keep must be at least 1 (the current generation), not {keep}")
    if grace_s < 0:
        raise ValueError(f"--grace must be >= 0 seconds, not {grace_s}")
    io = store_io(store)
    if not io.listdir(""):
        raise FileNotFoundError(f"no store at {io.where()}")
    newest = resolve_generation(io)
    listed = list_generations(io)
    generations = [g for g in listed if g <= newest]
    retained = generations[-keep:] if keep else generations
    newer = [g for g in listed if g > newest]  # never under the protocol
    referenced: set[str] = set()
    for g in retained + newer:
        read_manifest(io, g)  # a retained manifest that does not load stops gc here
        referenced |= _referenced(json.loads(io.read(manifest_relpath(g)).decode("utf-8")))

    now = time.time()
    runs = run_dirs(io)
    live = [run for run in runs if is_live(io, run, now)]
    report = GcReport(generation=newest, retained=retained, live_runs=len(live))
    candidates = [manifest_relpath(g) for g in generations if g not in retained]
    candidates += [dead_letter_relpath(g) for g in generations if g not in retained]
    young = [run for run in runs if run not in live]  # subject to the grace period
    if not live:  # dead-letter reports of runs that never committed
        last = max(newest, *newer, 0)
        for name in io.listdir(DEAD_LETTER_DIR):
            stem = name.removesuffix(".parquet")
            if stem.startswith("gen-") and stem[4:].isdigit() and int(stem[4:]) > last:
                young.append(f"{DEAD_LETTER_DIR}/{name}")
    for top in (SHARDS_DIR, TRANSFORM_DIR, INDEX_DIR, ARCHIVE_DATA_DIR, ARCHIVE_VERSIONS_DIR):
        for name in io.listdir(top):
            rel = f"{top}/{name}"
            if top == ARCHIVE_VERSIONS_DIR and version_of(name) is None:
                continue  # Lance's own hint of its latest version, rewritten by Lance
            if is_scratch(name) or (rel not in referenced and not live):
                young.append(rel)
            elif top == SHARDS_DIR and not live:  # lists a re-index replaced
                young += [f"{rel}/{n}" for n in io.listdir(rel) if f"{rel}/{n}" not in referenced]
    if not live:
        young += _unnamed_transactions(io, referenced)
    for top in ("", MANIFEST_DIR, DEAD_LETTER_DIR, JOURNAL_DIR):
        young += [f"{top}/{n}".lstrip("/") for n in io.listdir(top) if is_scratch(n)]
    usage = {rel: io.usage(rel) for rel in young}
    for rel in young:
        if usage[rel] and now - usage[rel].newest < grace_s:
            report.kept_young += 1
        else:
            candidates.append(rel)

    if not dry_run:
        update_current(io, newest)  # the hint never names a generation removed below
    removed = 0
    for rel in candidates:
        found = usage.get(rel) or io.usage(rel)
        if found is None:
            continue
        report.removed.append(rel)
        report.bytes += found.bytes
        if dry_run:
            continue
        io.remove(rel)
        removed += 1
        if removed == 1:
            maybe_fail("during_gc")
    log.info("gc %s: %s", io.where(), report.summary(dry_run))
    return report
