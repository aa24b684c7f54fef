"""Search latency of the next-token-filtered key search at 1M keys, d = 64.

Synthetic keys: unit vectors in 64 dimensions drawn around a few thousand random centres (so the
IVF lists are unevenly filled, as with real hidden states), next tokens drawn from a Zipf-like
distribution over a 49152-token vocabulary (so a few tokens own large groups, as in real text).
Queries are perturbed keys with the next token of that key, i.e. drawn from the same token
distribution the decoder meets. Prints p50/p99 per query for the exact-slice path, the IVF path
and the mix a store uses (exact for groups up to the threshold, IVF above), and saves JSON.

    .venv/bin/python benchmarks/search_latency.py [--keys 1000000] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from dresd.search import KeySearch


def synthetic_keys(n: int, dim: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim),
                                                                              dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks ** -1.1
    p /= p.sum()
    tokens = rng.permutation(vocab)[rng.choice(vocab, n, p=p)].astype(np.int32)
    return x.astype(np.float16), tokens


def filled_ivf(vectors: np.ndarray, nlist: int, seed: int) -> faiss.Index:
    x = vectors.astype(np.float32)
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.train(x[rng.choice(len(x), min(len(x), 64 * nlist), replace=False)])
    index.add(x)  # ids are rows, as in a shard's ivf.faiss
    return index


def measure(search: KeySearch, queries, tokens, k: int, nprobe: int) -> np.ndarray:
    times = np.empty(len(queries))
    for i, (q, t) in enumerate(zip(queries, tokens)):
        t0 = time.perf_counter()
        keys, _ = search.search(q, int(t), k, nprobe)
        times[i] = time.perf_counter() - t0
        assert len(keys) == min(k, search.group_size(int(t)))
    return times * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threshold", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/search_latency.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    vectors, tokens = synthetic_keys(args.keys, args.dim, args.vocab, args.seed)
    index = filled_ivf(vectors, args.nlist, args.seed)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 1)
    picks = rng.integers(0, args.keys, args.queries)
    q = vectors[picks].astype(np.float32) + 0.3 * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    qt = tokens[picks]

    t0 = time.perf_counter()
    search = KeySearch(vectors, tokens, [(index, 0)], nprobe=args.nprobe,
                       exact_threshold=args.threshold)
    load_s = time.perf_counter() - t0
    sizes = np.array([search.group_size(int(t)) for t in qt])
    big = sizes > args.threshold

    rows = {}
    store_mix = measure(search, q, qt, args.k, args.nprobe)
    rows["store (exact <= threshold, IVF above)"] = store_mix
    rows["  queries in small groups (exact)"] = store_mix[~big]
    rows["  queries in large groups (IVF)"] = store_mix[big]
    search.exact_threshold = 10**12
    rows["exact slice scan only"] = measure(search, q, qt, args.k, args.nprobe)
    search.exact_threshold = args.threshold

    print(f"{args.keys} keys, d={args.dim}, vocab {args.vocab}, nlist {args.nlist}, nprobe "
          f"{args.nprobe}, k {args.k}, threshold {args.threshold}; {args.queries} queries, "
          f"{big.mean():.0%} in groups > threshold (largest group {np.diff(search.offsets).max()})")
    print(f"setup: synthetic keys + IVF {build_s:.1f}s, KeySearch load {load_s:.1f}s, "
          f"IVF fallbacks to exact {search.fallbacks}")
    print(f"{'path':42s} {'n':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    result = {"config": vars(args), "machine": platform.platform(), "load_s": load_s,
              "fraction_large_groups": float(big.mean()), "paths": {}}
    for name, t in rows.items():
        if len(t) == 0:
            continue
        p50, p99 = np.percentile(t, [50, 99])
        print(f"{name:42s} {len(t):6d} {p50:8.3f} {p99:8.3f} {t.mean():8.3f}")
        result["paths"][name.strip()] = {"n": len(t), "p50_ms": p50, "p99_ms": p99,
                                         "mean_ms": float(t.mean())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
