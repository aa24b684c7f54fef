"""Build stores of millions of real tokens through the real pipeline, every stage measured.

    .venv/bin/python benchmarks/build_scale.py --tokens 1e6 --runner direct
    .venv/bin/python benchmarks/build_scale.py --tokens 1e6,1e7            # DaskRunner, 2 workers
    .venv/bin/python benchmarks/build_scale.py --tokens 1e7 --kill encode  # a worker lost
    .venv/bin/python benchmarks/build_scale.py --tokens 1e8 --serve-built --update 1e7 --compact

**Corpus**: the Python sources ``make install`` puts on every machine: the standard library
(``sysconfig``'s ``stdlib``) and the virtualenv's site-packages, every ``*.py`` file, in the
order of the SHA-256 of its path relative to its root (``stdlib/...`` or ``site-packages/...``),
then (the ``*.py`` files hold ~105.7M unique tokens, too few for a 10M update of a 100M store)
every C/C++/Cython source and header, type stub and reStructuredText/Markdown page
(``EXTRA_SUFFIXES``) in the same order, cut where the unique documents hold the target number of tokens (counted once with the real
tokenizer, plus EOS; a file whose content appeared earlier is not counted again, as the
builder's dedupe drops it). ``--update N`` adds the next N tokens of the same order to the
built store. Token counts are cached under the work directory.

**Model**: a stand-in of the default family: SmolLM2-135M-Instruct's own config and tokenizer
(49,152-token vocabulary, hidden size 576, the same key size d = 64 after PCA) with 1 layer
instead of 30, an MLP of width 256 instead of 1536, and random weights. What it changes: the
forward costs about 1/30 of the real one (~50 us/token on one core here), so the pipeline's own work, not the forward, is what is measured, and the keys carry no
meaning (the store's AL is not measured here). What it does not change: tokenization, documents,
shard sizes, key count and dimension, the transform fit, the quantizer training and fill,
bytes on disk, the runner and everything the launcher does.

**Runners**: ``dask-2`` is ``--runner=DaskRunner`` on a fresh ``dask.distributed``
LocalCluster of 2 worker processes, 1 thread each, started by this script; the launcher
(``pipelines.build.build_store``) runs in a child process, so its peak RSS is its own.
``direct`` is the default local runner in the child process. Every process runs torch with one
thread (OMP_NUM_THREADS=1), so a stage's thread CPU time is all its CPU.

**Measured per run**: wall time and tokens/s; per stage (pipelines.stage_clock: list, read,
dedupe, tokenize, sample pick / forward, fit, encode forward / write, train, fill, commit) CPU
seconds, busy wall seconds and span, and us of CPU per token; the CPU of every process (the
launcher's, and each worker's from ``os.times`` at the end), so the runner's own overhead is
the total less the timed stages; peak RSS (``VmHWM``) of the launcher and of each worker;
bytes each process wrote (``/proc/<pid>/io``) and the store's bytes by part.

``--kill encode|fill`` SIGKILLs one worker process when the first archive fragment (encode) or
the first inverted lists (fill) appear in the store, and reruns the same build if it stopped;
the run records what happened and the store's document, token and key counts, to be compared
with a clean build's.

Results merge into ``benchmarks/results/build-scale.{json,txt,png}`` (one entry per label).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = ROOT / "benchmarks" / "results" / "build-scale"
FORWARD_STAGES = ("sample_forward", "encode_forward")
# The stand-in's MLP width (the default's is 1536): one layer of it costs ~50 us/token on one
# core of this machine against ~95 with the default width, ~1.5 ms for the real 30 layers.
STAND_IN_MLP = 256


# ----------------------------------------------------------------------------- corpus

def corpus_roots() -> list[tuple[str, Path]]:
    site = Path(sysconfig.get_paths(vars={"base": sys.prefix, "platbase": sys.prefix})["purelib"])
    return [("stdlib", Path(sysconfig.get_paths()["stdlib"])), ("site-packages", site)]


# Read after every *.py file, so the first 105.7M tokens are the same with or without them.
EXTRA_SUFFIXES = (".pyi", ".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".pyx", ".pxd", ".rst",
                  ".md")


def ordered_sources() -> list[tuple[str, Path]]:
    """(relative name, path) of every *.py file under the roots, then of every file ending in
    one of ``EXTRA_SUFFIXES``; each group in SHA-256 order of the name."""
    groups: tuple[list, list] = ([], [])
    for label, root in corpus_roots():
        for p in root.rglob("*"):
            extra = p.suffix in EXTRA_SUFFIXES
            if (p.suffix == ".py" or extra) and p.is_file() and not p.is_symlink():
                groups[extra].append((f"{label}/{p.relative_to(root)}", p))
    def order(group):
        return sorted(group, key=lambda x: hashlib.sha256(x[0].encode()).hexdigest())

    return order(groups[0]) + order(groups[1])


def token_counts(model: str, sources, cache: Path) -> dict[str, int]:
    """{name: tokens + EOS} of each usable file (0: not UTF-8, empty, NUL or a repeated
    content), cached by name and size."""
    from pipelines.tokenize import load_tokenizer

    counts = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [(n, p) for n, p in sources if f"{n}:{p.stat().st_size}" not in counts]
    if todo:
        tokenizer, _ = load_tokenizer(model)
        print(f"counting tokens of {len(todo)} files ...", flush=True)
        for i in range(0, len(todo), 512):
            names, texts = [], []
            for n, p in todo[i:i + 512]:
                try:
                    text = p.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    text = ""
                names.append(f"{n}:{p.stat().st_size}")
                texts.append(text if text.strip() and "\x00" not in text else "")
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for name, text, toks in zip(names, texts, ids):
                counts[name] = [len(toks) + 1 if text else 0,
                                hashlib.sha256(text.encode()).hexdigest()[:16]]
        cache.write_text(json.dumps(counts))
    return counts


def pick_files(model: str, skip: int, tokens: int, work: Path) -> tuple[list[str], int]:
    """Files after the first ``skip`` unique tokens of the order, until ``tokens`` more."""
    sources = ordered_sources()
    counts = token_counts(model, sources, work / "token-counts.json")
    seen, total, files, taken = set(), 0, [], 0
    for name, path in sources:
        n, digest = counts[f"{name}:{path.stat().st_size}"]
        repeated = n == 0 or digest in seen  # the builder reads it, and drops it
        seen.add(digest)
        if total >= skip:
            files.append(str(path))
            taken += 0 if repeated else n
        total += 0 if repeated else n
        if taken >= tokens:
            break
    return files, taken


# ----------------------------------------------------------------------------- stand-in model

def stand_in_model(dest: Path) -> str:
    """The default model's config with one layer, random weights (seed 0), and its tokenizer."""
    if (dest / "config.json").exists():
        return str(dest)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dresd.models import resolve_model_path

    source = resolve_model_path("default")
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = 1
    config.intermediate_size = STAND_IN_MLP
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return str(dest)


# ----------------------------------------------------------------------------- one launch

def peak_rss_mb() -> int:
    """This process's own peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries the parent's peak
    into a child across fork (or vfork) and exec, so a launcher or Dask worker started by a
    large process reports at least that process's peak (the 100M run of 2026-12-06 recorded
    1728 MB for its launcher and for both update workers, the peak of this script's own
    process, which had counted the corpus's tokens)."""
    from pipelines.stage_clock import peak_rss_mb as own_peak

    return own_peak()


def proc_write_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def launch(spec: dict) -> dict:
    """Run one build, update or compaction in this process (the launcher); its figures."""
    from pipelines.build import build_store, compact_store, update_store
    from pipelines.config import BuildConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    beam_args = None
    if spec["scheduler"]:
        beam_args = ["--runner=DaskRunner", f"--dask_client_address={spec['scheduler']}"]
    config = BuildConfig(model=spec["model"], progress=False)
    files = json.loads(Path(spec["files"]).read_text()) if spec["files"] else []
    stats: dict = {}
    start = time.perf_counter()
    if spec["op"] == "build":
        manifest = build_store(files, spec["store"], config, beam_args, stats)
    elif spec["op"] == "update":
        manifest = update_store(files, spec["store"], config, beam_args, stats)
    else:
        manifest = compact_store(spec["store"], spec.get("shard_tokens"), beam_args)
    wall = time.perf_counter() - start
    ru = resource.getrusage(resource.RUSAGE_SELF)
    metrics = stats.get("metrics")
    return {
        "wall_s": wall,
        "launcher": {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": peak_rss_mb(),
                     "write_bytes": proc_write_bytes()},
        "launcher_stages": stats.get("launcher", {}),
        "stages": {k: v.as_dict() for k, v in metrics.stages.items()} if metrics else {},
        "counters": metrics.counters if metrics else {},
        "store": {"generation": manifest.generation, "documents": manifest.num_docs,
                  "tokens": manifest.num_tokens, "keys": manifest.num_keys,
                  "shards": len(manifest.shards)},
    }


# ----------------------------------------------------------------------------- orchestration

def _worker_figures():
    """Run on each worker at the end: its CPU, peak RSS and bytes written."""
    t = os.times()
    return {"pid": os.getpid(), "cpu_s": t.user + t.system, "peak_rss_mb": peak_rss_mb(),
            "write_bytes": proc_write_bytes()}


class Killer(threading.Thread):
    """SIGKILLs one worker process when the stage's first output appears in the store."""

    def __init__(self, stage: str, store: Path, pids: list[int]):
        super().__init__(daemon=True)
        self.stage, self.store, self.pids = stage, store, pids
        self.killed: dict | None = None
        self.done = threading.Event()

    def stage_started(self) -> bool:
        if self.stage == "encode":
            return any((self.store / "archive.lance" / "data").glob("*.lance"))
        return any((self.store / "shards").glob("*/ivf*.lists"))

    def run(self):
        start = time.perf_counter()
        while not self.done.is_set():
            if self.stage_started():
                pid = self.pids[-1]
                os.kill(pid, signal.SIGKILL)
                self.killed = {"pid": pid, "after_s": round(time.perf_counter() - start, 1)}
                print(f"killed worker {pid} ({self.stage} had started)", flush=True)
                return
            time.sleep(0.2)


def store_bytes(store: Path) -> dict[str, int]:
    """The store's bytes by part: shard files by name, lists, the archive, the rest by folder."""
    out: dict[str, int] = {}
    for p in store.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(store).parts
        if rel[0] == "shards":
            part = "shards/ivf*.lists" if p.name.startswith("ivf") else f"shards/{p.name}"
        else:
            part = rel[0]
        out[part] = out.get(part, 0) + p.stat().st_size
    return dict(sorted(out.items()))


def run_launch(op: str, runner: str, store: Path, files: list[str], model: str, work: Path,
               kill: str = "", shard_tokens: int | None = None) -> dict:
    """One launch in a child process, on a fresh cluster for dask; figures of every process."""
    cluster = client = None
    files_json = work / f"files-{op}.json"
    files_json.write_text(json.dumps(files))
    spec = {"op": op, "store": str(store), "files": str(files_json) if files else "",
            "model": model, "scheduler": "", "shard_tokens": shard_tokens}
    if runner.startswith("dask-"):
        from distributed import Client, LocalCluster

        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
        cluster = LocalCluster(n_workers=int(runner.split("-")[1]), threads_per_worker=1,
                               processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        spec["scheduler"] = cluster.scheduler_address
    spec_path = work / f"spec-{op}.json"
    spec_path.write_text(json.dumps(spec))
    out_path = work / f"out-{op}.json"
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "launch", str(spec_path), str(out_path)]
    killer = None
    attempts = []
    try:
        for attempt in range(2):
            if kill and attempt == 0 and client is not None:
                pids = sorted(client.run(os.getpid).values())
                killer = Killer(kill, store, pids)
                killer.start()
            start = time.perf_counter()
            rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
            attempts.append({"rc": rc, "wall_s": round(time.perf_counter() - start, 1)})
            if killer:
                killer.done.set()
            if rc == 0 or not kill:
                break
            print(f"the {op} stopped (rc={rc}); rerunning the same command", flush=True)
        if attempts[-1]["rc"] != 0:
            raise SystemExit(f"{op} failed: {attempts}")
        result = json.loads(out_path.read_text())
        workers = list(client.run(_worker_figures).values()) if client is not None else []
    finally:
        if client is not None:
            client.close()
            cluster.close()
    result["workers"] = workers
    result["attempts"] = attempts
    if killer:
        if killer.killed is None:
            raise SystemExit(f"--kill {kill}: no worker was killed (the stage's output never "
                             "appeared while the build ran)")
        result["killed"] = killer.killed
    return result


def summarize(label: str, op: str, runner: str, result: dict, store: Path) -> dict:
    stages = result["stages"]
    tokens = {"build": result["store"]["tokens"], "compact": result["store"]["tokens"]}.get(
        op, result["counters"].get("encoded_tokens", 0))
    cpu_total = result["launcher"]["cpu_s"] + sum(w["cpu_s"] for w in result["workers"])
    forward = sum(stages[s]["cpu_s"] for s in FORWARD_STAGES if s in stages)
    timed = sum(s["cpu_s"] for s in stages.values())
    launcher_timed = sum(v["cpu_s"] for v in result["launcher_stages"].values())
    row = {
        "label": label, "op": op, "runner": runner, "date": time.strftime("%Y-%m-%d"),
        "tokens": tokens, "wall_s": round(result["wall_s"], 1),
        "tokens_per_s": round(tokens / result["wall_s"]) if tokens else None,
        "cpu_s": round(cpu_total, 1), "forward_cpu_s": round(forward, 1),
        "own_cpu_s": round(cpu_total - forward, 1),
        "own_us_per_token": round((cpu_total - forward) / tokens * 1e6, 2) if tokens else None,
        "runner_overhead_cpu_s": round(cpu_total - timed - launcher_timed, 1),
        "launcher_peak_rss_mb": round(result["launcher"]["peak_rss_mb"]),
        "worker_peak_rss_mb": [round(w["peak_rss_mb"]) for w in result["workers"]],
        "write_bytes": result["launcher"]["write_bytes"]
        + sum(w["write_bytes"] for w in result["workers"]),
        "store_bytes": store_bytes(store),
        "stages": stages, "launcher_stages": result["launcher_stages"],
        "store": result["store"], "attempts": result["attempts"],
    }
    if "killed" in result:
        row["killed"] = result["killed"]
    return row


def stage_table(row: dict) -> str:
    tokens = max(row["tokens"] or 1, 1)
    lines = [f"  {'stage':16s} {'calls':>6s} {'CPU s':>8s} {'us/tok':>7s} {'busy s':>8s} "
             f"{'span s':>8s} {'tok/s (CPU)':>12s} {'peak MB':>8s}"]
    items = [(k, {"calls": 1, "wall_s": v["wall_s"], "span_s": v["wall_s"], **v})
             for k, v in row["launcher_stages"].items()] + list(row["stages"].items())
    for name, s in items:
        rate = tokens / s["cpu_s"] if s["cpu_s"] > 0 else float("inf")
        lines.append(f"  {name:16s} {s['calls']:6d} {s['cpu_s']:8.1f} "
                     f"{s['cpu_s'] / tokens * 1e6:7.2f} {s['wall_s']:8.1f} {s['span_s']:8.1f} "
                     f"{rate:12.0f} {s.get('peak_mb') or '':>8}")
    lines.append(f"  {'runner, rest':16s} {'':6s} {row['runner_overhead_cpu_s']:8.1f} "
                 f"{row['runner_overhead_cpu_s'] / tokens * 1e6:7.2f}")
    return "\n".join(lines)


def report(rows: list[dict]) -> str:
    head = (f"{'label':24s} {'tokens':>11s} {'wall s':>8s} {'tok/s':>7s} {'CPU s':>8s} "
            f"{'own us/tok':>10s} {'launcher MB':>11s} {'workers MB':>12s} {'B/token':>8s}")
    lines = [head]
    for r in rows:
        b = sum(r["store_bytes"].values()) / max(r["store"]["tokens"], 1)
        lines.append(
            f"{r['label']:24s} {r['tokens']:11,d} {r['wall_s']:8.1f} {r['tokens_per_s'] or 0:7d} "
            f"{r['cpu_s']:8.1f} {r['own_us_per_token'] or 0:10.2f} "
            f"{r['launcher_peak_rss_mb']:11d} {'/'.join(map(str, r['worker_peak_rss_mb'])):>12s} "
            f"{b:8.1f}")
    for r in rows:
        lines += ["", f"{r['label']} ({r['date']}): {r['store']}"
                  + (f"; killed {r['killed']}, attempts {r['attempts']}" if "killed" in r else ""),
                  stage_table(r)]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    builds = [r for r in rows if r["op"] == "build" and "killed" not in r]
    if not builds:
        return
    stages = sorted({s for r in builds for s in r["stages"]})
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = [0.0] * len(builds)
    for s in stages:
        vals = [r["stages"].get(s, {}).get("cpu_s", 0) / r["tokens"] * 1e6 for r in builds]
        a.bar([r["label"] for r in builds], vals, bottom=bottom, label=s)
        bottom = [x + y for x, y in zip(bottom, vals)]
    a.axhline(25, color="k", ls="--", lw=0.8, label="25 us target (own cost)")
    a.set_ylabel("CPU us per token")
    a.set_title("CPU per token by stage")
    a.tick_params(axis="x", rotation=30)
    a.legend(fontsize=7)
    for r in builds:
        b.scatter([r["tokens"]], [r["launcher_peak_rss_mb"]], marker="o", color="C0")
        for w in r["worker_peak_rss_mb"]:
            b.scatter([r["tokens"]], [w], marker="x", color="C1")
    b.set_xscale("log")
    b.set_xlabel("tokens")
    b.set_ylabel("peak RSS MB")
    b.set_title("peak RSS: launcher (o), workers (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    return [r for r in old if r["label"] not in {n["label"] for n in new}] + new


def save(rows_new: list[dict], meta: dict, serving_new: list[dict] = ()) -> None:
    path = RESULTS.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    runs = merged(old["runs"], rows_new)
    serving = merged(old.get("serving", []), list(serving_new))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "runs": runs, "serving": serving}, indent=1)
                    + "\n")
    text = report(runs) + serving_report(serving)
    RESULTS.with_suffix(".txt").write_text(text + "\n\n" + json.dumps(meta) + "\n")
    plot(runs, RESULTS.with_suffix(".png"))
    print(text)


SERVING_FIGURES = ("serving_bytes_per_token", "load_s", "rss_after_load_mb",
                   "rss_after_queries_mb", "p50_ms", "p99_ms", "recall_at_10")


def predicted_row(keys: int, shards: int) -> dict:
    """The synthetic store of ``benchmarks/scale.py`` closest to a real one: nearest key count
    (in log), then nearest shard count."""
    import math

    rows = json.loads((ROOT / "benchmarks" / "results" / "scale.json").read_text())["rows"]
    return min(rows, key=lambda r: (round(abs(math.log(r["keys"] / keys)), 1),
                                    abs(r["shards"] - shards)))


def serve(label: str, store: Path, queries: int, recall_queries: int) -> dict:
    """What ``benchmarks/scale.py`` measures of its synthetic stores (load time, RssAnon, p50/p99
    of ``Store.continuations``, recall@10 against exact search), measured on a built store in a
    fresh process, keys from its archive, beside the synthetic prediction."""
    child = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--measure", str(store),
         "--archived", "--queries", str(queries), "--recall-queries", str(recall_queries),
         "--no-progress"],
        stdout=subprocess.PIPE, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(next(line for line in child.stdout.splitlines()
                        if line.startswith("RESULT "))[7:])
    m["serving_bytes_per_token"] = m["bytes_per_token"]["serving"]
    pred = predicted_row(m["keys"], m["shards"])
    return {"label": label, "date": time.strftime("%Y-%m-%d"), "store": str(store),
            "keys": m["keys"], "tokens": m["tokens"], "shards": m["shards"],
            "nlist": m["nlist"], "nprobe": m["nprobe"], "factory": m["factory"],
            "queries": m["queries"], "recall_queries": m["recall_queries"],
            "bytes_per_token": m["bytes_per_token"], "stats_summary": m["stats_summary"],
            "measured": {k: m[k] for k in SERVING_FIGURES},
            # before the queries, after reading the query keys from the archive
            "rss_after_key_reads_mb": m.get("rss_after_key_reads_mb"),
            "predicted_from": {k: pred[k] for k in ("keys", "shards", "nlist", "factory")},
            "predicted": {k: pred[k] for k in SERVING_FIGURES}}


def serving_report(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        p = r["predicted_from"]
        lines += ["", f"{r['label']} ({r['date']}): {r['tokens']:,} tokens, {r['shards']} shards, "
                  f"{r['factory']}, nprobe {r['nprobe']}; {r['queries']:,} queries, recall on "
                  f"{r['recall_queries']}; predicted by the synthetic store of {p['keys']:,} "
                  f"keys in {p['shards']} shards ({p['factory']})",
                  f"  {'figure':24s} {'built':>10s} {'synthetic':>10s} {'ratio':>7s}"]
        for k in SERVING_FIGURES:
            a, b = r["measured"][k], r["predicted"][k]
            lines.append(f"  {k:24s} {a:10.3f} {b:10.3f} {a / b if b else float('nan'):7.2f}")
        if r.get("rss_after_key_reads_mb") is not None:
            lines.append(f"  RssAnon after reading the query keys, before the queries: "
                         f"{r['rss_after_key_reads_mb']:.1f} MB")
    return "\n".join(lines)


def human(n: float) -> str:
    return f"{n / 1e6:g}M"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "launch":
        result = launch(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1e6", help="comma-separated store sizes in tokens")
    ap.add_argument("--runner", default="dask-2", help="dask-<workers> or direct")
    ap.add_argument("--kill", choices=("", "encode", "fill"), default="",
                    help="SIGKILL a worker when this stage starts (dask only)")
    ap.add_argument("--update", type=float, default=0, help="then add this many new tokens")
    ap.add_argument("--compact", action="store_true", help="then compact the store")
    ap.add_argument("--compact-shard-tokens", type=float, default=4e6,
                    help="shard size the compaction merges up to (the build's shards are ~1M)")
    ap.add_argument("--work", default="/tmp/dresd-build-scale", help="stores and caches")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--tag", default="", help="appended to every label (e.g. 'before')")
    ap.add_argument("--serve", nargs="*", metavar="LABEL=STORE", default=None,
                    help="measure built stores as benchmarks/scale.py measures its synthetic "
                         "ones, beside its prediction (no build)")
    ap.add_argument("--queries", type=int, default=10_000, help="with --serve or --serve-built")
    ap.add_argument("--recall-queries", type=int, default=300,
                    help="with --serve or --serve-built")
    ap.add_argument("--serve-built", action="store_true",
                    help="also measure each built store (before any update) and the compacted "
                         "one as --serve does")
    args = ap.parse_args()
    if args.kill and not args.runner.startswith("dask-"):
        sys.exit("--kill needs a dask runner")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = stand_in_model(work / "stand-in-model")
    meta = {"machine": platform.platform(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "corpus": "stdlib + site-packages *.py, then *" + "/*".join(EXTRA_SUFFIXES)
                      + ", each in SHA-256 order of relative path",
            "model": f"SmolLM2-135M-Instruct config, 1 layer, MLP width {STAND_IN_MLP}, random weights (seed 0)"}
    if args.serve is not None:
        old = json.loads(RESULTS.with_suffix(".json").read_text())
        save([], old["meta"], [serve(*item.split("=", 1), args.queries, args.recall_queries)
                               for item in args.serve])
        return
    rows, serving = [], []
    for size in (float(x) for x in args.tokens.split(",")):
        tokens = int(size)
        files, corpus_tokens = pick_files(model, 0, tokens, work)
        label = f"build-{human(tokens)}-{args.runner}" + (f"-kill-{args.kill}" if args.kill
                                                           else "") + args.tag
        print(f"{label}: {len(files)} files, {corpus_tokens:,} tokens", flush=True)
        store = work / f"store-{label.removeprefix('build-')}"
        shutil.rmtree(store, ignore_errors=True)
        result = run_launch("build", args.runner, store, files, model, work, args.kill)
        rows.append(summarize(label, "build", args.runner, result, store))
        rows[-1]["corpus"] = {"files": len(files), "tokens": corpus_tokens}
        save(rows, meta)
        if args.serve_built:
            serving.append(serve(f"serve-{label}", store, args.queries, args.recall_queries))
            save(rows, meta, serving)
        if args.update:
            more, more_tokens = pick_files(model, tokens, int(args.update), work)
            result = run_launch("update", args.runner, store, more, model, work)
            rows.append(summarize(f"update-{human(args.update)}-on-{human(tokens)}{args.tag}", "update",
                                  args.runner, result, store))
            rows[-1]["corpus"] = {"files": len(more), "tokens": more_tokens}
            save(rows, meta)
        if args.compact:
            result = run_launch("compact", args.runner, store, [], model, work,
                                shard_tokens=int(args.compact_shard_tokens))
            rows.append(summarize(f"compact-{human(tokens)}{args.tag}", "compact", args.runner, result,
                                  store))
            save(rows, meta)
            if args.serve_built:
                serving.append(serve(f"serve-compact-{human(tokens)}", store, args.queries,
                                     args.recall_queries))
                save(rows, meta, serving)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
