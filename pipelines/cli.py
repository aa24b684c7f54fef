"""Builder subcommands of ``dresd``, registered through the ``dresd.commands`` entry point.

    dresd build STORE CORPUS... [build options] [Beam pipeline options]
    dresd update STORE CORPUS... [options]
    dresd compact STORE [--shard-tokens N]
    dresd reindex STORE [--nlist N] [--index-kind K] [--pq-m M] [--nprobe P]
    dresd gc STORE [--keep N] [--dry-run] [--grace SECONDS]
    dresd generate-corpus OUTPUT.jsonl PROMPTS... [generation options]

Arguments these commands do not know (``--runner=...``, ``--direct_num_workers=2``, ...) are
handed to Beam untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from dresd.config import add_arguments, from_arguments
from pipelines.config import INDEX_KINDS, BuildConfig, GenerateConfig

# Fixed by the store an update extends; an update reads them from its manifest.
STORE_FIXED = ("dim", "value_len", "index_kind", "nlist", "nprobe", "pq_m", "pq_nbits",
               "sample_size", "train_size", "seed", "archive")


def _quiet_beam(args) -> None:
    """Without --verbose: no Beam INFO lines, none of the warnings Beam logs on import about
    Google Cloud clients it cannot find, and no per-load weight bars from transformers."""
    if getattr(args, "verbose", False):
        return
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # Beam logs its "apitools not found" on the root logger
    try:
        import apache_beam  # noqa: F401
    finally:
        root.setLevel(level)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _summary(manifest, seconds: float) -> str:
    return (f"generation {manifest.generation}: {len(manifest.shards)} shard(s), "
            f"{manifest.num_docs} documents, {manifest.num_tokens} tokens, "
            f"{manifest.num_keys} keys, d={manifest.dim}, {manifest.index.kind} "
            f"nlist={manifest.index.nlist} ({seconds:.1f} s)")


def run_build(args) -> int:
    _quiet_beam(args)  # before Beam is imported
    from pipelines.build import build_store

    start = time.perf_counter()
    manifest = build_store(args.corpus, args.store, from_arguments(BuildConfig, args), args.extra)
    print(_summary(manifest, time.perf_counter() - start))
    print(f"transform explained variance: {manifest.transform.explained_variance:.3f}")
    return 0


def run_update(args) -> int:
    _quiet_beam(args)  # before Beam is imported
    from pipelines.build import update_store
    from schemas import read_manifest

    current = read_manifest(args.store)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)
              if hasattr(args, f.name)}
    values["model"] = args.model or current.model.name
    start = time.perf_counter()
    manifest = update_store(args.corpus, args.store, BuildConfig(**values), args.extra,
                            rebase=args.rebase)
    if manifest.generation == current.generation:
        print(f"no new documents: generation {current.generation} stays current")
    else:
        print(_summary(manifest, time.perf_counter() - start))
    return 0


def run_compact(args) -> int:
    _quiet_beam(args)  # before Beam is imported
    from pipelines.build import compact_store

    start = time.perf_counter()
    manifest = compact_store(args.store, args.shard_tokens, args.extra)
    print(_summary(manifest, time.perf_counter() - start))
    return 0


def run_reindex(args) -> int:
    _quiet_beam(args)  # before Beam is imported
    from pipelines.reindex import ReindexSettings, reindex_store

    start = time.perf_counter()
    settings = ReindexSettings(index_kind=args.index_kind, nlist=args.nlist, pq_m=args.pq_m,
                               pq_nbits=args.pq_nbits, nprobe=args.nprobe,
                               train_size=args.train_size, seed=args.seed)
    manifest = reindex_store(args.store, settings, args.extra)
    print(_summary(manifest, time.perf_counter() - start))
    return 0


def run_gc(args) -> int:
    from pipelines.gc import collect_garbage

    report = collect_garbage(args.store, args.keep, args.dry_run, args.grace)
    if args.dry_run:
        for path in report.removed:
            print(f"would remove {path}")
    print(report.summary(args.dry_run))
    return 0


def run_generate(args) -> int:
    _quiet_beam(args)  # before Beam is imported
    from pipelines.generate import generate_corpus

    start = time.perf_counter()
    out = generate_corpus(args.prompts, args.output, from_arguments(GenerateConfig, args),
                          args.extra)
    with open(out, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    print(f"{n} prompt/response records written to {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build a new store from a corpus (Beam pipeline)")
    p.add_argument("store", help="store directory to create, or an s3://bucket/prefix")
    p.add_argument("corpus", nargs="+", help="directories (files chosen by --glob), .jsonl or "
                   ".parquet files; local or URLs (s3://...)")
    add_arguments(p, BuildConfig)
    p.set_defaults(func=run_build, accepts_extra=True)

    p = subparsers.add_parser("update", help="add the corpus documents a store lacks, as a new "
                              "generation")
    p.add_argument("store")
    p.add_argument("corpus", nargs="+")
    add_arguments(p, BuildConfig, skip=STORE_FIXED + ("model",))
    p.add_argument("--model", default=None,
                   help="target model (default: the one named in the store's manifest)")
    p.add_argument("--rebase", action="store_true",
                   help="if another writer commits first, add this update's shards on top of "
                        "its generation when none of their documents overlap (default: fail "
                        "with a commit conflict; rerun)")
    p.set_defaults(func=run_update, accepts_extra=True)

    p = subparsers.add_parser("compact", help="merge small shards into a new generation")
    p.add_argument("store")
    p.add_argument("--shard-tokens", type=int, default=BuildConfig().shard_tokens,
                   help="largest merged shard in tokens (default: %(default)s)")
    p.set_defaults(func=run_compact, accepts_extra=True)

    p = subparsers.add_parser("reindex", help="train a new index from the store's key archive "
                              "and commit it as a new generation (no model needed)")
    p.add_argument("store")
    p.add_argument("--index-kind", choices=INDEX_KINDS, default=None,
                   help="ivf_pq or ivf_flat (default: the store's)")
    p.add_argument("--nlist", type=int, default=0,
                   help="IVF lists (default 0: about 4*sqrt(keys), as a build picks)")
    p.add_argument("--pq-m", type=int, default=0,
                   help="PQ sub-quantizers, must divide d (default 0: d/4)")
    p.add_argument("--pq-nbits", type=int, default=None,
                   help="bits per PQ code (default: the store's, or 8)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="lists probed per query by default (default: the store's)")
    p.add_argument("--train-size", type=int, default=0,
                   help="archive keys sampled to train the quantizer (default 0: as a build)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the training")
    p.set_defaults(func=run_reindex, accepts_extra=True)

    p = subparsers.add_parser("gc", help="remove temporary files, unreferenced shards and, with "
                              "--keep, old generations")
    p.add_argument("store")
    p.add_argument("--keep", type=int, default=None,
                   help="keep the newest N generations (default: all); the current one always")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.add_argument("--grace", type=float, default=3600.0,
                   help="leave garbage modified within this many seconds (a run may be starting; "
                        "default: %(default)s)")
    p.set_defaults(func=run_gc)

    p = subparsers.add_parser("generate-corpus", help="generate the model's own responses to "
                              "prompts, as a JSONL corpus for build")
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("prompts", nargs="+", help=".jsonl or .parquet prompt files, or directories")
    add_arguments(p, GenerateConfig)
    p.set_defaults(func=run_generate, accepts_extra=True)
