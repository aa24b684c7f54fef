"""What the key archive costs and what `dresd reindex` gives back, measured on one corpus.

    .venv/bin/python benchmarks/archive.py [--id-prompts 64] [--prompts 16]

On one in-domain corpus (the default model's greedy answers to ``--id-prompts`` stdlib signature
prompts and to HumanEval's held-out problems: the ID store's corpus, benchmarks/corpora.py, cut
short) and with the real default model, in this order and one at a time:

1. build without the archive (``--no-archive``) and 2. with it (the default): the archive's cost
   in build time and in bytes per token;
3. ``dresd reindex`` of store 2 to half its number of lists (no model), timed against build 2;
4. a fresh build with that same nlist;
5. the acceptance replay (benchmarks/replay.py, ``--drafting-ms 1``, HumanEval evaluation
   prompts 0..N-1, none of which is in the corpus) of the re-indexed store 3 and the fresh store
   4: AL of the dense drafter at the 4x8 budget and of the default (hybrid, calibrated).

Results: benchmarks/results/archive-id<id_prompts>.json and .txt.

    .venv/bin/python benchmarks/archive.py --stand-in 200000

measures only the build-time cost (builds without and with the archive, alternated, twice each)
on ``--stand-in`` tokens of standard-library sources with a stand-in for the forward: a randomly
initialised one-layer model of the default's family and sizes (hidden 576, d = 64, the real
default tokenizer), so the archive's cost is set against the pipeline's own, as on a cluster
where a GPU makes the forward cheap. Results: benchmarks/results/archive-standin-<N>.json, .txt.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPLAY_RUNS = "dense:4x8,hybrid:calibrated"


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def replay(stores: list[Path], prompts: int, out: Path) -> dict:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replay.py"), "--prompts",
                    str(prompts), "--drafting-ms", "1", "--runs", REPLAY_RUNS, "--stores",
                    ",".join(str(s) for s in stores), "--out", str(out)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def stand_in_model(dest: Path) -> str:
    """The default model's config with one layer, random weights, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dresd.models import resolve_model_path

    source = resolve_model_path("default")
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return str(dest)


def stand_in(tokens: int, sample_size: int) -> None:
    from benchmarks.encode import pick_corpus
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    tmp = Path(tempfile.mkdtemp(prefix="dresd-archive-standin-"))
    try:
        model = stand_in_model(tmp / "model")
        files, corpus_tokens = pick_corpus(model, tokens)
        runs = []
        for rep in range(2):
            for archive in (False, True):
                store = tmp / f"store-{rep}-{archive}"
                config = BuildConfig(model=model, sample_size=sample_size, glob="*.py",
                                     progress=False, archive=archive)
                manifest, seconds = timed(build_store, files, store, config)
                b = manifest.storage_bytes()
                runs.append({"archive": archive, "seconds": seconds,
                             "tokens": manifest.num_tokens,
                             "archive_bytes_per_token": b["archive"] / manifest.num_tokens,
                             "serving_bytes_per_token": b["serving"] / manifest.num_tokens})
                shutil.rmtree(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mean = {a: sum(r["seconds"] for r in runs if r["archive"] == a) / 2 for a in (False, True)}
    row = {"date": time.strftime("%Y-%m-%d"), "corpus_tokens": corpus_tokens, "runs": runs,
           "mean_s": {"no_archive": mean[False], "archive": mean[True]},
           "overhead": mean[True] / mean[False] - 1}
    out = ROOT / "benchmarks" / "results" / f"archive-standin-{tokens}"
    out.with_suffix(".json").write_text(json.dumps(row, indent=1) + "\n")
    text = (f"{row['date']}: {runs[0]['tokens']} tokens, stand-in forward (1 random layer of the "
            f"default's sizes): build without archive {mean[False]:.1f} s, with "
            f"{mean[True]:.1f} s ({100 * row['overhead']:+.1f}%; runs "
            + ", ".join(f"{r['seconds']:.1f}{'a' if r['archive'] else ''}" for r in runs)
            + f"); archive {runs[1]['archive_bytes_per_token']:.1f} bytes/token, serving "
            f"{runs[1]['serving_bytes_per_token']:.1f}")
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--id-prompts", type=int, default=64,
                    help="stdlib signature prompts answered for the corpus (the ID store: 552)")
    ap.add_argument("--sample-size", type=int, default=4096,
                    help="hidden states sampled to fit the transform")
    ap.add_argument("--prompts", type=int, default=16, help="HumanEval prompts replayed")
    ap.add_argument("--shard-tokens", type=int, default=8000,
                    help="tokens per shard: several shards, so that a fresh build (new shard "
                         "ids) draws another training sample than the re-index")
    ap.add_argument("--keep", default="", help="keep the stores in this directory")
    ap.add_argument("--stand-in", type=int, default=0, metavar="TOKENS",
                    help="only the build-time cost, on this many tokens with a stand-in model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.stand_in:
        stand_in(args.stand_in, args.sample_size)
        return

    from benchmarks.corpora import RUNS, completions
    from benchmarks.prompts import heldout_humaneval_prompts, stdlib_signature_prompts
    from pipelines.build import build_store
    from pipelines.config import BuildConfig
    from pipelines.reindex import ReindexSettings, reindex_store

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="dresd-archive-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = RUNS / f"corpus-archive-id{args.id_prompts}"
    completions(stdlib_signature_prompts(args.id_prompts), corpus / "completions.jsonl",
                "default", 256)
    completions(heldout_humaneval_prompts(), corpus / "humaneval.jsonl", "default", 256)
    files = [corpus]
    config = BuildConfig(sample_size=args.sample_size, glob="*.jsonl", progress=False,
                         shard_tokens=args.shard_tokens)
    rows = {}
    try:
        plain, plain_s = timed(build_store, files, tmp / "no-archive",
                               BuildConfig(**{**config.__dict__, "archive": False}))
        kept, kept_s = timed(build_store, files, tmp / "archive", config)
        nlist = max(1, kept.index.nlist // 2)
        shutil.copytree(tmp / "archive", tmp / "reindexed")
        reindexed, reindex_s = timed(reindex_store, tmp / "reindexed",
                                     ReindexSettings(nlist=nlist))
        fresh, fresh_s = timed(build_store, files, tmp / "fresh",
                               BuildConfig(**{**config.__dict__, "nlist": nlist}))
        result = replay([tmp / "reindexed", tmp / "fresh"], args.prompts,
                        tmp / "replay.json")
        bytes_kept = kept.storage_bytes()
        rows = {
            "date": time.strftime("%Y-%m-%d"), "corpus": str(corpus.relative_to(ROOT)),
            "store_tokens": kept.num_tokens, "keys": kept.num_keys, "dim": kept.dim,
            "build_no_archive_s": plain_s, "build_archive_s": kept_s,
            "archive_build_overhead": kept_s / plain_s - 1,
            "bytes_per_token": {k: v / kept.num_tokens for k, v in bytes_kept.items()},
            "serving_bytes_per_token_no_archive":
                plain.storage_bytes()["serving"] / plain.num_tokens,
            "nlist_built": kept.index.nlist, "nlist_reindexed": nlist,
            "reindex_s": reindex_s, "reindex_over_build": reindex_s / kept_s,
            "fresh_build_s": fresh_s, "replay_prompts": args.prompts,
            "replay": {label.replace(str(tmp) + "/", ""): r for label, r in
                       result["results"].items()},
        }
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / f"archive-id{args.id_prompts}"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    lines = [f"{rows['date']}: {rows['store_tokens']} tokens, {rows['keys']} keys, "
             f"d={rows['dim']}, default model on {sys.platform}",
             f"build without archive {rows['build_no_archive_s']:.1f} s, with "
             f"{rows['build_archive_s']:.1f} s ({100 * rows['archive_build_overhead']:+.1f}%)",
             f"bytes/token: serving {rows['bytes_per_token']['serving']:.1f}, archive "
             f"{rows['bytes_per_token']['archive']:.1f}",
             f"reindex nlist {rows['nlist_built']} -> {nlist}: {reindex_s:.1f} s "
             f"({100 * rows['reindex_over_build']:.1f}% of the build); fresh build at nlist "
             f"{nlist}: {fresh_s:.1f} s"]
    for method in REPLAY_RUNS.split(","):
        name, budget = method.split(":")
        al = {s: rows["replay"][f"{name}/{s}/{budget}"]["AL"] for s in ("reindexed", "fresh")}
        lines.append(f"replay {name} {budget}: AL re-indexed {al['reindexed']:.3f}, fresh build "
                     f"{al['fresh']:.3f} ({100 * (al['reindexed'] / al['fresh'] - 1):+.2f}%)")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"replay: {tmp / 'replay.json'} (summary in {out.with_suffix('.json')})")


if __name__ == "__main__":
    main()
