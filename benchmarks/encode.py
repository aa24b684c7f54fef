"""Encode throughput of the build pipeline against the bare model forward, and bytes per token.

    nice .venv/bin/python benchmarks/encode.py [--max-tokens 100000] [--device cpu]

The corpus is a deterministic subset of the Python standard library's sources (files in the
order of their path's hash, until ``--max-tokens``). It is built into a store with the real
pipeline (``pipelines.build.build_store``, DirectRunner, default build options), then the same
model runs over exactly the batches the pipeline ran, with nothing else around it.

What each row times:

* bare forward (the ceiling): ``model.base_model(input_ids, attention_mask)`` under
  ``torch.inference_mode`` (and bf16 autocast on CUDA, as the pipeline) over every batch of
  every shard: each shard's documents are read back from the store in the order the shard holds
  them and cut into windows and batches by the pipeline's own ``split_windows`` and
  ``token_budget_batches``; the padded input tensors are built before the clock starts. No LM
  head, as in the pipeline. One small warm-up forward is not timed.
* pipeline encode stage: from the first document any encoder received to the last shard written
  (the ``EncodeTiming`` Beam metrics of the run): batching and padding, forward, projection to
  keys, the float16 copy and the Arrow and Lance writes. Not the encoder's model load (shown
  apart), nor tokenization, sampling, fitting, index filling or publishing.
* pipeline end to end: the whole ``build_store`` call, fixed costs included (Beam startup,
  three model loads: fingerprint, sampler, encoder), plus the sample encode that fits the
  transform (2 x sample_size tokens) and the index fill; at this corpus size those weigh a lot.

Bytes per token on disk are those ``dresd info`` reports (keys, values, index, other). The
results go to ``benchmarks/results/encode-<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corpora import take_until  # noqa: E402
from benchmarks.prompts import stdlib_sources  # noqa: E402
from dresd.commands.info import describe  # noqa: E402
from dresd.models import load_model, pick_device  # noqa: E402
from pipelines.build import build_store  # noqa: E402
from pipelines.config import BuildConfig  # noqa: E402
from pipelines.forward import split_windows, token_budget_batches  # noqa: E402
from pipelines.tokenize import load_tokenizer  # noqa: E402
from schemas import read_manifest  # noqa: E402
from schemas.shard_io import read_docs, read_tokens  # noqa: E402


def pick_corpus(model: str, max_tokens: int) -> tuple[list[Path], int]:
    """Stdlib files in the order of their path's hash until they hold ``max_tokens`` tokens."""
    tokenizer, _ = load_tokenizer(model)
    files = sorted(stdlib_sources(), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest()
                   + str(p))

    def count(path: Path) -> int | None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return None
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS

    return take_until(files, count, max_tokens)


def pipeline_batches(store: Path, config: BuildConfig) -> list[list[np.ndarray]]:
    """The rows of every forward batch the pipeline ran, shard by shard, in its order."""
    batches = []
    for shard in read_manifest(store).shards:
        tokens = np.asarray(read_tokens(store, shard.shard_id))
        docs = read_docs(store, shard.shard_id).to_pydict()
        streams = [tokens[s:s + n] for s, n in zip(docs["start"], docs["length"])]
        windows = split_windows(streams, config.max_len)
        for batch in token_budget_batches([len(w.tokens) for w in windows], config.batch_tokens):
            batches.append([windows[i].tokens for i in batch])
    return batches


def padded(rows: list[np.ndarray], pad_id: int, device: torch.device):
    """(input_ids, attention_mask or None) as ``HiddenStateModel.forward`` builds them."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    attention = None if mask.all() else torch.from_numpy(mask).to(device)
    return torch.from_numpy(ids).to(device), attention


def bare_forward(config: BuildConfig, batches: list[list[np.ndarray]]) -> dict:
    from tqdm.auto import tqdm

    model, tokenizer = load_model(config.model, config.device or None, config.dtype or None)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
    inputs = [padded(rows, pad_id, device) for rows in batches]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    tokens = sum(len(r) for rows in batches for r in rows)
    with torch.inference_mode(), autocast:
        model.base_model(input_ids=inputs[-1][0][:1, :128])  # warm-up, not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        bar = tqdm(total=tokens, desc="bare forward", unit="tok", unit_scale=True, leave=False)
        start, cpu = time.perf_counter(), time.process_time()
        for (ids, mask), rows in zip(inputs, batches):
            model.base_model(input_ids=ids, attention_mask=mask)
            bar.update(sum(len(r) for r in rows))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        bar.close()
    padded_tokens = sum(int(ids.numel()) for ids, _ in inputs)
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "batches": len(batches),
            "padded_tokens": padded_tokens, "dtype": str(next(model.parameters()).dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=100_000, help="corpus size in tokens")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="", help="torch device ('' picks CUDA when present)")
    ap.add_argument("--sample-size", type=int, default=BuildConfig().sample_size,
                    help="hidden states sampled to fit the transform (the build's default)")
    ap.add_argument("--out", default="", help="JSON output (default: "
                    "benchmarks/results/encode-<device>.json)")
    ap.add_argument("--store", default="", help="where to build the store (default: a "
                    "temporary directory, removed afterwards)")
    args = ap.parse_args()

    device = pick_device(args.device or None)
    config = BuildConfig(model=args.model, device=args.device, sample_size=args.sample_size,
                         glob="*.py")
    load_before = os.getloadavg()
    print(f"picking stdlib sources up to {args.max_tokens} tokens ...", flush=True)
    files, corpus_tokens = pick_corpus(args.model, args.max_tokens)
    print(f"corpus: {len(files)} files, {corpus_tokens} tokens; device {device}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    tmp = None
    if args.store:
        store = Path(args.store)
        if store.exists():
            sys.exit(f"{store} exists; give a new directory")
    else:
        tmp = tempfile.mkdtemp(prefix="dresd-encode-bench-")
        store = Path(tmp) / "store"
    try:
        print("building the store (pipeline) ...", flush=True)
        stats: dict = {}
        start, cpu = time.perf_counter(), time.process_time()
        manifest = build_store(files, store, config, stats=stats)
        build_s, build_cpu = time.perf_counter() - start, time.process_time() - cpu
        timing = stats["metrics"].encode
        if timing is None:
            sys.exit("the runner reported no encode metrics")
        info = describe(str(store))
        print("bare forward over the same batches ...", flush=True)
        bare = bare_forward(config, pipeline_batches(store, config))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    if bare["tokens"] != timing.tokens:
        sys.exit(f"bare forward saw {bare['tokens']} tokens, the pipeline {timing.tokens}")

    bare_tps = bare["tokens"] / bare["seconds"]
    bare_cpu_tps = bare["tokens"] / bare["cpu_seconds"]
    rows = [
        ("bare forward (ceiling)", bare["tokens"], bare["seconds"], bare["cpu_seconds"]),
        ("pipeline encode stage", timing.tokens, timing.stage_s, timing.cpu_s),
        ("  of which forward + projection", timing.tokens, timing.forward_s, None),
        ("pipeline end to end (build_store)", manifest.num_tokens, build_s, build_cpu),
    ]
    print()
    print(f"{manifest.num_docs} documents, {manifest.num_tokens} tokens, {manifest.num_keys} keys; "
          f"{device} {bare['dtype']}, torch threads {torch.get_num_threads()}; "
          f"{bare['batches']} batches, padding {1 - bare['tokens'] / bare['padded_tokens']:.1%}")
    print(f"{'':36s} {'tokens':>7s} {'wall s':>7s} {'tok/s':>6s} {'vs bare':>7s}  "
          f"{'CPU s':>7s} {'tok/CPU-s':>9s} {'vs bare':>7s}")
    table = {}
    for name, tokens, seconds, cpu in rows:
        tps = tokens / seconds
        row = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tps,
               "ratio_to_bare": tps / bare_tps}
        line = f"{name:36s} {tokens:7d} {seconds:7.1f} {tps:6.0f} {tps / bare_tps:7.2f}"
        if cpu:
            row.update(cpu_seconds=cpu, tokens_per_cpu_s=tokens / cpu,
                       cpu_ratio_to_bare=tokens / cpu / bare_cpu_tps)
            line += f"  {cpu:7.1f} {tokens / cpu:9.0f} {tokens / cpu / bare_cpu_tps:7.2f}"
        print(line)
        table[name.strip()] = row
    print(f"encoder model load (not in the stage): {timing.setup_s:.1f} s; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print()
    print(f"{'on disk':10s} {'MiB':>10s} {'bytes/token':>12s}")
    for part in ("values", "index", "docs", "shared", "serving", "archive", "total"):
        print(f"{part:10s} {info['bytes'][part] / 2**20:10.2f} "
              f"{info['bytes_per_token'][part]:12.2f}")

    out = Path(args.out or Path(__file__).parent / "results" / f"encode-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {**vars(args), "device": str(device), "dtype": bare["dtype"],
                   "torch_threads": torch.get_num_threads(), "batch_tokens": config.batch_tokens,
                   "max_len": config.max_len, "dim": config.dim},
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after},
        "corpus": {"files": len(files), "documents": manifest.num_docs,
                   "tokens": manifest.num_tokens, "keys": manifest.num_keys},
        "batches": bare["batches"], "padded_tokens": bare["padded_tokens"],
        "throughput": table,
        "ratio": timing.tokens_per_s / bare_tps,
        "cpu_ratio": timing.tokens / timing.cpu_s / bare_cpu_tps if timing.cpu_s else None,
        "encoder_setup_s": timing.setup_s,
        "bytes": info["bytes"], "bytes_per_token": info["bytes_per_token"],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nencode stage / bare forward = {result['ratio']:.2f} (wall), "
          f"{result['cpu_ratio'] or 0:.2f} (CPU time); saved {out}")


if __name__ == "__main__":
    main()
