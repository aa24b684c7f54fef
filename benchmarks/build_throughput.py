"""Whole-build throughput on the DirectRunner and on Dask with 1 and 2 worker processes.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/build_throughput.py [--max-tokens 20000]
    .venv/bin/python benchmarks/build_throughput.py --quick    # a smoke run, tiny random model

The same corpus (a deterministic subset of the Python standard library's sources: files in the
order of their path's hash until ``--max-tokens``, as benchmarks/encode.py picks it) is built
into a fresh store by ``pipelines.build.build_store`` once per runner:

* ``direct``: the default local runner (FnApiRunner, in this process);
* ``dask-1``, ``dask-2``: ``--runner=DaskRunner`` on a ``dask.distributed`` LocalCluster of 1 or
  2 worker processes with 1 thread each, started fresh for the run (so every run pays its
  workers' imports and model load) and stopped after it. Starting the cluster is timed apart.

A row's tokens/s is the store's tokens over the whole ``build_store`` call: the launcher's model
fingerprint, tokenization, the sample encode that fits the transform, encoding, index training
and filling, and publishing. The encode stage (Beam metrics, ``EncodeTiming``) is shown beside
it. On a 2-core machine this shows the distributed engine's overhead, not a speedup.

The model is the real default (SmolLM2-135M-Instruct, float32 on CPU) unless ``--model`` names
another; ``--quick`` builds a tiny random Llama (tests/tiny_models.py) and a ~6k-token corpus to
check that everything runs. Results go to benchmarks/results/build-throughput-<device>.json and
.txt (``build-throughput-quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNNERS = ("direct", "dask-1", "dask-2")


def start_cluster(workers: int):
    """A LocalCluster of ``workers`` processes, 1 thread each (the nanny gives each worker
    OMP_NUM_THREADS=1, so torch runs one thread per worker)."""
    from distributed import LocalCluster

    # Workers unpickle the pipelines' functions by module name: without an installed package
    # they find it through PYTHONPATH, which their processes inherit.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, paths)])
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        dashboard_address=None, silence_logs=logging.ERROR)


def run_one(runner: str, files: list[Path], store: Path, config) -> dict:
    from pipelines.build import build_store

    cluster, cluster_s, beam_args = None, 0.0, None
    if runner.startswith("dask-"):
        start = time.perf_counter()
        cluster = start_cluster(int(runner.split("-")[1]))
        cluster_s = time.perf_counter() - start
        beam_args = ["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]
    # Beam's run leaves the root logger at INFO; the cluster's INFO lines would bury the table.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        stats: dict = {}
        start = time.perf_counter()
        manifest = build_store(files, store, config, beam_args, stats)
        seconds = time.perf_counter() - start
    finally:
        if cluster is not None:
            cluster.close()
    timing = stats["metrics"].encode
    return {
        "runner": runner, "documents": manifest.num_docs, "tokens": manifest.num_tokens,
        "keys": manifest.num_keys, "shards": len(manifest.shards), "seconds": seconds,
        "tokens_per_s": manifest.num_tokens / seconds, "cluster_start_s": cluster_s,
        "encode_stage_s": timing.stage_s if timing else None,
        "encode_tokens_per_s": timing.tokens_per_s if timing else None,
        "model_load_s": timing.setup_s if timing else None,
    }


def quick_model(tmp: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    return str(save_tiny_model("llama", tmp / "tiny-llama"))


def table(rows: list[dict]) -> str:
    lines = [f"{'runner':8s} {'docs':>5s} {'tokens':>7s} {'shards':>6s} {'build s':>8s} "
             f"{'tok/s':>7s} {'encode tok/s':>12s} {'model load s':>12s} {'cluster s':>9s}"]
    for r in rows:
        enc = f"{r['encode_tokens_per_s']:12.0f}" if r["encode_tokens_per_s"] else f"{'-':>12s}"
        load = f"{r['model_load_s']:12.1f}" if r["model_load_s"] is not None else f"{'-':>12s}"
        lines.append(f"{r['runner']:8s} {r['documents']:5d} {r['tokens']:7d} {r['shards']:6d} "
                     f"{r['seconds']:8.1f} {r['tokens_per_s']:7.0f} {enc} {load} "
                     f"{r['cluster_start_s']:9.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=20_000, help="corpus size in tokens")
    ap.add_argument("--model", default="default", help="target model (default: SmolLM2-135M)")
    ap.add_argument("--sample-size", type=int, default=4096,
                    help="hidden states sampled to fit the transform (the build's default, "
                         "16384, would encode a 20k-token corpus almost twice)")
    ap.add_argument("--runners", default=",".join(RUNNERS),
                    help=f"comma-separated subset of {','.join(RUNNERS)}")
    ap.add_argument("--quick", action="store_true",
                    help="tiny random model and a ~6k-token corpus: checks that it runs")
    ap.add_argument("--out", default="", help="output base path without suffix (default: "
                    "benchmarks/results/build-throughput-<device>)")
    args = ap.parse_args()
    runners = [r for r in args.runners.split(",") if r]
    if unknown := set(runners) - set(RUNNERS):
        sys.exit(f"unknown runner(s) {sorted(unknown)}; choose from {RUNNERS}")

    import torch

    from benchmarks.encode import pick_corpus
    from dresd.models import pick_device
    from pipelines.config import BuildConfig

    tmp = Path(tempfile.mkdtemp(prefix="dresd-build-bench-"))
    try:
        model, max_tokens, sample_size = args.model, args.max_tokens, args.sample_size
        if args.quick:
            model, max_tokens, sample_size = quick_model(tmp), min(max_tokens, 6000), 600
        config = BuildConfig(model=model, sample_size=sample_size, glob="*.py", progress=False,
                             dim=64 if not args.quick else 16)
        files, corpus_tokens = pick_corpus(model, max_tokens)
        device = pick_device(None)
        model_name = "tiny random llama (--quick)" if args.quick else args.model
        print(f"corpus: {len(files)} stdlib files, {corpus_tokens} tokens; model {model_name}; "
              f"{device}; launcher torch threads {torch.get_num_threads()}", flush=True)
        load_before = os.getloadavg()
        rows = []
        for runner in runners:
            print(f"building with {runner} ...", flush=True)
            rows.append(run_one(runner, files, tmp / f"store-{runner}", config))
            print(table(rows[-1:]).splitlines()[1], flush=True)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counts = {(r["documents"], r["tokens"], r["keys"]) for r in rows}
    if len(counts) > 1:
        sys.exit(f"the runners built different stores: {counts}")
    text = table(rows)
    note = (f"{platform.platform()}, {os.cpu_count()} cores, load average {load_before[0]:.1f} "
            f"before, {load_after[0]:.1f} after; model {model_name}, {device}; "
            f"sample_size {sample_size}")
    print()
    print(text)
    print(note)
    name = "build-throughput-quick" if args.quick else f"build-throughput-{device.type}"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {**vars(args), "model_used": "tiny random llama" if args.quick else model,
                   "sample_size": sample_size, "dim": config.dim,
                   "batch_tokens": config.batch_tokens, "shard_tokens": config.shard_tokens},
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "device": str(device),
        "launcher_torch_threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": load_after},
        "corpus": {"files": len(files), "tokens": corpus_tokens},
        "runs": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".txt").write_text(text + "\n" + note + "\n")
    print(f"saved {out.with_suffix('.json')} and .txt")


if __name__ == "__main__":
    main()
