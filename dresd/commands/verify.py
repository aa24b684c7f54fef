"""``dresd verify STORE``: checksum every file a store's generations name, in parallel.

Files recorded as verified and unchanged since (same size, mtime, ctime and inode;
schemas.integrity) are skipped unless ``--force``; every file that passes is recorded, so a later
``load_store`` counts it as verified and a later ``verify`` skips it. Exit status 0 when every
file matches its manifest, 1 when one does not (each named on stderr). Store files are never
modified in place, so this catches whatever was: a truncated file by its size, a file overwritten
with zeros (even an ``ivf.lists`` whose header was left intact, which a load accepts and whose
keys a search then silently never finds) by its checksum.
"""

from __future__ import annotations

import sys
import time


def run(args) -> int:
    from tqdm import tqdm

    from schemas import list_generations, read_manifest
    from schemas.integrity import check_present, verify_files
    from schemas.manifest import current_generation
    from schemas.storage import is_remote

    store = args.store
    if is_remote(store):
        raise ValueError(f"dresd verify checks a local store directory, not {store}; a remote "
                         "store's files are checksummed as `load_store` (or `dresd generate "
                         "--store`) downloads them into the local cache")
    gens = list_generations(store) if args.all_generations else [
        args.generation or current_generation(store)]
    refs = []
    for g in gens:
        refs += read_manifest(store, g).files()
    refs = list(dict.fromkeys(refs))
    missing = []
    for ref in refs:
        try:
            check_present(store, [ref])
        except Exception as e:  # noqa: BLE001 - reported per file below
            missing.append((ref, str(e)))
    present = [r for r in refs if r not in {m[0] for m in missing}]
    total = sum(r.bytes for r in present)
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify",
              disable=args.no_progress) as bar:
        report = verify_files(store, present, threads=args.threads, force=args.force,
                              on_bytes=bar.update)
    seconds = time.perf_counter() - start
    bad = missing + report.corrupt
    for ref, why in bad:
        print(f"dresd verify: CORRUPT {ref.path}: {why}", file=sys.stderr)
    print(f"{len(refs)} files of generation(s) {', '.join(map(str, gens))}: "
          f"{len(report.checked)} checksummed ({report.checked_bytes / 2**20:.1f} MiB in "
          f"{seconds:.1f} s), {len(report.skipped)} already verified and unchanged, "
          f"{len(bad)} corrupt")
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser("verify", help="checksum every file of a store (parallel, recorded so "
                       "unchanged files are not checked again)")
    p.add_argument("store", help="store directory")
    p.add_argument("--generation", type=int, default=None, help="a generation other than CURRENT")
    p.add_argument("--all-generations", action="store_true",
                   help="every generation's files, not only the current one's")
    p.add_argument("--threads", type=int, default=4, help="files checksummed at once")
    p.add_argument("--force", action="store_true", help="checksum recorded files again too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
