"""Recall of a real store's search against exact search over its own archived keys.

The scale benchmark measures recall on synthetic keys (isotropic noise around cluster centres in
all 64 dimensions), the hardest case for product quantization. This script measures it where it
matters: on a store built from real text, whose float16 key archive (``archive.lance``) gives the
exact answer. For ``--queries`` keys of the store, each used as a query with its next token, it
compares the top 10 of

- the store's own search (``Store.search``, at the store's nprobe and at ``--nprobe``), and
- indexes trained here on the same keys with other encodings (``--variants``: faiss factory
  suffixes after ``IVF<nlist>_HNSW32,``; ``OPQ...`` variants get the rotation in front),

with the exact top 10 among all keys followed by the same token, the query itself excluded.
Bytes per key of each encoding are printed next to its recall, so the trade-off is explicit.

    .venv/bin/python benchmarks/recall.py runs/store-ood-130k
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 10
VARIANTS = "Flat,PQ16x8,OPQ16_64|PQ16x8,PQ16x10,PQ32x8"


def archived_keys(store):
    """Every key of the store (float32), its shard, position and next token."""
    from schemas.archive import read_shard_keys

    m = store.manifest
    parts = []
    for i, (info, shard) in enumerate(zip(m.shards, store.shards)):
        if info.archive is None:
            raise SystemExit(f"shard {info.shard_id} has no key archive (built with "
                             "--no-archive): rebuild it with the archive to measure recall")
        tokens = np.asarray(shard.tokens)
        pos, keys = read_shard_keys(store.path, info)
        keys = keys.astype(np.float32)
        parts.append((keys, np.full(len(pos), i), pos, tokens[pos + 1].astype(np.int64)))
    return [np.concatenate(x) for x in zip(*parts)]


def exact_top(keys, tokens, queries):
    out = []
    for i in queries:
        cand = np.flatnonzero(tokens == tokens[i])
        cand = cand[cand != i]
        out.append(set(cand[np.argsort(-(keys[cand] @ keys[i]))[:K]].tolist()))
    return out


def recall(exact, found) -> float:
    return float(np.mean([len(e & f) / len(e) for e, f in zip(exact, found) if e]))


def store_search(store, keys, shard, pos, tokens, queries, nprobe):
    from schemas.lists import unpack_ids

    row = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(shard, pos))}
    found, lat = [], []
    for i in queries:
        t = time.perf_counter()
        sh, ids, _ = store.search.search(keys[i], int(tokens[i]), K + 1, nprobe=nprobe)
        lat.append(time.perf_counter() - t)
        rows = [row[(int(s), int(p))] for s, p in zip(sh, unpack_ids(ids)[1])]
        found.append(set([r for r in rows if r != i][:K]))
    return found, float(np.median(lat) * 1e3)


def variant_search(variant, keys, tokens, queries, nlist, nprobes, seed):
    import faiss

    pre, _, enc = variant.rpartition("|")
    factory = f"{pre + ',' if pre else ''}IVF{nlist}_HNSW32,{enc}"
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = keys[rng.choice(len(keys), min(len(keys), max(65_536, 39 * nlist)), replace=False)]
    t = time.perf_counter()
    index.train(train)
    index.add(keys)
    build_s = time.perf_counter() - t
    ivf = faiss.extract_index_ivf(index)
    out = {}
    for nprobe in nprobes:
        found = []
        for i in queries:
            sel = faiss.IDSelectorBatch(np.flatnonzero(tokens == tokens[i]).astype(np.int64))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
            if pre:
                params = faiss.SearchParametersPreTransform(index_params=params)
            _, ids = index.search(keys[i : i + 1], K + 1, params=params)
            found.append(set([int(j) for j in ids[0] if j >= 0 and j != i][:K]))
        out[nprobe] = found
    return factory, int(ivf.code_size), build_s, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--nprobe", default="16,64", help="nprobe values to measure")
    ap.add_argument("--variants", default=VARIANTS,
                    help="comma-separated encodings ('' for none); 'PRE|ENC' puts PRE in front")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="JSON results (default benchmarks/results/"
                                              "recall-<store name>.json)")
    args = ap.parse_args(argv)

    import faiss

    import dresd

    faiss.omp_set_num_threads(1)
    store = dresd.load_store(args.store)
    keys, shard, pos, tokens = archived_keys(store)
    rng = np.random.default_rng(args.seed)
    queries = rng.choice(len(keys), min(args.queries, len(keys)), replace=False)
    exact = exact_top(keys, tokens, queries)
    nprobes = [int(x) for x in args.nprobe.split(",") if x]
    m = store.manifest
    rows = []
    print(f"{len(keys):,} keys, d={keys.shape[1]}, nlist {m.index.nlist}, store index "
          f"{m.index.factory}; recall@{K} against exact filtered search, {len(queries)} queries")
    for nprobe in nprobes:
        found, p50 = store_search(store, keys, shard, pos, tokens, queries, nprobe)
        rows.append(dict(what="store search", factory=m.index.factory,
                         code_bytes=m.index.code_size, nprobe=nprobe,
                         recall=recall(exact, found), p50_ms=p50))
        print(f"  store search  {m.index.factory:32s} {m.index.code_size:3d} B/key  nprobe "
              f"{nprobe:3d}  recall {rows[-1]['recall']:.3f}  p50 {p50:.2f} ms", flush=True)
    for variant in [v for v in args.variants.split(",") if v]:
        factory, code, build_s, out = variant_search(variant, keys, tokens, queries,
                                                     m.index.nlist, nprobes, args.seed)
        for nprobe, found in out.items():
            rows.append(dict(what="variant", factory=factory, code_bytes=code, nprobe=nprobe,
                             recall=recall(exact, found), train_add_s=build_s))
            print(f"  variant       {factory:32s} {code:3d} B/key  nprobe {nprobe:3d}  recall "
                  f"{rows[-1]['recall']:.3f}", flush=True)
    name = Path(args.store).resolve().name
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"recall-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(store=name, keys=len(keys), nlist=m.index.nlist,
                                   queries=len(queries), k=K,
                                   measured=time.strftime("%Y-%m-%d %H:%M"), rows=rows),
                              indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
