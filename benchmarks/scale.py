"""Scale benchmark: synthetic stores of 1M, 10M, 100M keys through the real writers and runtime.

No model. Every store is written shard by shard through the project's own code: the shard writer
(``schemas.shard_io.write_shard``), the index training (``pipelines.fit.train_index`` on keys
drawn by ``pipelines.index.sample_keys``), the fill (``pipelines.index.fill_shard_index``), the
manifest (``schemas.write_manifest``), and opened with ``dresd.load_store``.

Synthetic data (deterministic per shard from ``--seed``, so it can be regenerated for the exact
check without keeping the keys in RAM): documents of 200-2000 tokens; tokens Zipf-distributed
(p ~ rank^-1.1) over the real 49,152-token vocabulary of SmolLM2; the key at position t is a
unit vector in d = 64 around one of 8 centres (out of 16,384) chosen for its next token
``tokens[t + 1]`` (keys that predict the same token cluster, as hidden states do), with noise of
about 0.6 of the centre's norm. The transform is fitted on raw keys only so that the store is
complete: the keys are used as already transformed. Queries: a random key of the store,
perturbed, with its next token (the decoder's query distribution).

Measured at each size: bytes per token by part (serving set and the float16 archive), index
training time, fill throughput (keys/s and time per key), ``load_store`` time, anonymous resident
memory (RssAnon: page cache and mapped files excluded) before and after load and after the
queries, p50/p99 latency of ``Store.continuations`` with the runtime's defaults (k = 10, the
store's nprobe) over ``--queries`` queries, and recall@10 of that filtered search against an
exact filtered search (brute force over every key followed by the query's token, float16 keys as
stored) on ``--recall-queries`` of them. Measurements run in a fresh process per store.

    .venv/bin/python benchmarks/scale.py --keys 1e6,1e7          # ~1.5 and ~6 min, 1 thread
    .venv/bin/python benchmarks/scale.py --keys 1e8              # the one-off 100M run, ~1 h

Building is resumable: a store's progress is kept in ``<workdir>/scale-<N>/.scale-state.json``
(shards written, quantizer trained, shards filled), so a rerun after an interruption continues
where it stopped. Results go to ``--out`` (JSON, a PNG of every figure against key count, and
a text table with the extrapolation to 1B keys), merged with earlier sizes in the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 49_152  # SmolLM2's vocabulary
DIM = 64
CENTRES = 16_384
CENTRES_PER_TOKEN = 8
NOISE = 0.6 / math.sqrt(DIM)  # per dimension: the noise vector's norm is ~0.6
QUERY_NOISE = 0.3 / math.sqrt(DIM)
K = 10


# --------------------------------------------------------------------------- synthetic data


def _globals(seed: int):
    rng = np.random.default_rng([seed, 1])
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    token_centres = rng.integers(0, CENTRES, (VOCAB, CENTRES_PER_TOKEN))
    p = np.arange(1, VOCAB + 1, dtype=np.float64) ** -1.1
    rank_to_token = rng.permutation(VOCAB)
    return centres, token_centres, np.cumsum(p / p.sum()), rank_to_token


def synthetic_shard(seed: int, shard: int, tokens_per_shard: int, g=None):
    """(tokens int32 [T], doc starts, doc lengths, keys float16 [T, d]) of shard ``shard``."""
    centres, token_centres, cdf, rank_to_token = g or _globals(seed)
    rng = np.random.default_rng([seed, 2, shard])
    lengths = rng.integers(200, 2001, tokens_per_shard // 200 + 2)
    ends = np.cumsum(lengths)
    n_docs = int(np.searchsorted(ends, tokens_per_shard)) + 1
    lengths = lengths[:n_docs].copy()
    lengths[-1] -= int(ends[n_docs - 1] - tokens_per_shard)
    if lengths[-1] < 2:  # keep every document at least 2 tokens long
        lengths[-2] += lengths[-1]
        lengths = lengths[:-1]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ranks = np.minimum(np.searchsorted(cdf, rng.random(tokens_per_shard)), VOCAB - 1)
    tokens = rank_to_token[ranks].astype(np.int32)
    nxt = np.append(tokens[1:], tokens[0])
    which = rng.integers(0, CENTRES_PER_TOKEN, tokens_per_shard)
    keys = np.empty((tokens_per_shard, DIM), np.float16)
    step = 1 << 18
    for a in range(0, tokens_per_shard, step):
        b = min(a + step, tokens_per_shard)
        x = centres[token_centres[nxt[a:b], which[a:b]]]
        x += NOISE * rng.standard_normal((b - a, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keys[a:b] = x
    return tokens, starts.astype(np.int64), lengths.astype(np.int32), keys


# --------------------------------------------------------------------------- building


def _state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def build(store: Path, num_keys: int, shard_tokens: int, seed: int, progress: bool) -> dict:
    """Write (or finish writing) the synthetic store; returns the build timings."""
    from tqdm import tqdm

    from pipelines.archive import write_fragment
    from pipelines.config import BuildConfig
    from pipelines.documents import WrittenShard
    from pipelines.encode import archive_rows
    from pipelines.fit import fit_keys, train_index
    from pipelines.index import auto_train_size, fill_shard_index, sample_keys
    from schemas import Manifest, ModelSpec, write_manifest
    from schemas.manifest import CURRENT_FILE, ArchiveFragment, FileRef
    from schemas.shard_io import ShardData, shard_info, write_shard

    store.mkdir(parents=True, exist_ok=True)
    state_path = store / ".scale-state.json"
    state = _state(state_path)
    if (store / CURRENT_FILE).exists() and state.get("done"):
        return state["timings"]
    n_shards = max(1, math.ceil(num_keys / shard_tokens))
    state.setdefault("written", [])
    state.setdefault("timings", {})
    t = state["timings"]
    config = BuildConfig(dim=DIM, seed=seed, progress=False)
    g = _globals(seed)

    # 1. shards: tokens, docs and their float16 keys as archive fragments, one at a time
    start = time.perf_counter()
    with tqdm(total=n_shards, initial=len(state["written"]), desc=f"write {num_keys:.0e}",
              disable=not progress) as bar:
        for s in range(len(state["written"]), n_shards):
            size = min(shard_tokens, num_keys - s * shard_tokens) + 0
            tokens, starts, lengths, keys = synthetic_shard(seed, s, size, g)
            data = ShardData(
                tokens=tokens, doc_ids=[f"{s:06d}-{i:08d}".ljust(64, "0") for i in
                                        range(len(starts))],
                sources=[f"synthetic/{s}/{i}" for i in range(len(starts))],
                starts=starts, lengths=lengths, vectors=keys)
            sid = write_shard(store, data, shard_id=f"s-{s:06d}")
            fragment = write_fragment(store, archive_rows(sid, data))
            del data, keys
            state["written"].append(dict(shard_id=sid, num_docs=len(starts),
                                         num_tokens=len(tokens),
                                         num_keys=len(tokens) - len(starts),
                                         archive=_json(fragment)))
            t["write_s"] = t.get("write_s", 0) + time.perf_counter() - start
            start = time.perf_counter()
            _save_state(state_path, state)
            bar.update()
    shards = [WrittenShard(**{**w, "archive": ArchiveFragment(
        file=FileRef(**w["archive"]["file"]), lance=w["archive"]["lance"])})
        for w in state["written"]]
    total_keys = sum(s.num_keys for s in shards)

    # 2. transform (on raw keys, only so the store is complete) and quantizer
    if "quantizer" not in state:
        fitted = fit_keys(synthetic_shard(seed, 0, min(shard_tokens, 20_000), g)[3]
                          .astype(np.float32), config, str(store))
        start = time.perf_counter()
        sample = sample_keys(str(store), shards, auto_train_size(total_keys), seed)
        t["sample_s"] = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        fitted = train_index(sample, config, total_keys, str(store), fitted)
        t["train_s"] = time.perf_counter() - start
        t["train_cpu_s"] = time.process_time() - cpu
        t["train_size"] = len(sample)
        del sample
        state["quantizer"] = {"transform": fitted.transform_spec.file.path,
                              "index": fitted.index_spec.quantizer.path}
        state["fitted"] = _fitted_to_json(fitted)
        _save_state(state_path, state)
    fitted_specs = _fitted_from_json(state["fitted"])
    quantizer = (store / fitted_specs[1].quantizer.path).read_bytes()

    # 3. fill every shard's inverted lists from its fragment (dropped after: the serving set
    #    is what this benchmark measures, as a --no-archive build leaves it)
    state.setdefault("filled", [])
    done = {f["shard_id"] for f in state["filled"]}
    with tqdm(total=total_keys, initial=sum(f["num_keys"] for f in state["filled"]),
              unit="key", unit_scale=True, desc=f"fill {num_keys:.0e}",
              disable=not progress) as bar:
        for s in shards:
            if s.shard_id in done:
                continue
            start, cpu = time.perf_counter(), time.process_time()
            fill_shard_index(store, s.shard_id, quantizer, VOCAB, s.archive)
            (store / s.archive.file.path).unlink()
            t["fill_s"] = t.get("fill_s", 0) + time.perf_counter() - start
            t["fill_cpu_s"] = t.get("fill_cpu_s", 0) + time.process_time() - cpu
            info = shard_info(str(store), s.shard_id, s.num_docs, s.num_tokens, s.num_keys, 1)
            state["filled"].append(_json(info))
            _save_state(state_path, state)
            bar.update(s.num_keys)
    infos = [_shardinfo(d) for d in state["filled"]]
    model = ModelSpec(name="synthetic", fingerprint="0" * 64, tokenizer_fingerprint="0" * 64,
                      model_type="synthetic", hidden_size=DIM, vocab_size=VOCAB,
                      eos_token_id=0)
    if not (store / CURRENT_FILE).exists():
        write_manifest(store, Manifest(generation=1, model=model, layer=-1, value_len=20,
                                       transform=fitted_specs[0], index=fitted_specs[1],
                                       shards=tuple(infos), note="benchmarks/scale.py"))
    t["keys"] = total_keys
    state["done"] = True
    _save_state(state_path, state)
    return t


def _json(x):
    from dataclasses import asdict

    return asdict(x)


def _fitted_to_json(fitted) -> dict:
    return {"transform": _json(fitted.transform_spec), "index": _json(fitted.index_spec)}


def _fitted_from_json(d):
    from schemas import FileRef, IndexSpec, TransformSpec

    t, i = dict(d["transform"]), dict(d["index"])
    t["file"] = FileRef(**t["file"])
    i["quantizer"] = FileRef(**i["quantizer"])
    return TransformSpec(**t), IndexSpec(**i)


def _shardinfo(d):
    from schemas import ShardInfo

    return ShardInfo.from_dict(d)


def compacted_copy(store: Path, shard_tokens: int) -> tuple[Path, dict]:
    """A copy of ``store`` (hard links: store files are never rewritten) compacted into shards
    of up to ``shard_tokens`` tokens by the real `dresd compact`; returns it and the timings."""
    import resource
    import shutil

    copy = store.parent / f"{store.name}-compact"
    stamp = copy / ".scale-compact.json"
    if stamp.exists():
        return copy, json.loads(stamp.read_text())
    if copy.exists():  # an interrupted earlier attempt
        shutil.rmtree(copy)
    shutil.copytree(store, copy, copy_function=os.link)
    before = len(_state(store / ".scale-state.json")["written"])
    print(f"compacting {copy} ({before} shards) to shards of <= {shard_tokens:,} tokens",
          flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "dresd"), "compact", str(copy),
                    "--shard-tokens", str(shard_tokens)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    timings = dict(compact_s=time.perf_counter() - start,
                   compact_cpu_s=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
                   compacted_from_shards=before)
    _save_state(stamp, timings)
    return copy, timings


# --------------------------------------------------------------------------- measuring


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (Linux /proc; mapped files and the
    page cache excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _layout(store: Path, m) -> list[dict]:
    """Where each synthetic shard (in build order) lies in the store: its store shard and the
    offset of its first token there. As built, synthetic shard s is store shard s; compaction
    concatenates consecutive shards in manifest order (pipelines.compact.plan_merges), so a
    compacted store holds runs of them back to back."""
    written = _state(store / ".scale-state.json")["written"]
    out, j, offset = [], 0, 0
    for w in written:
        if offset == m.shards[j].num_tokens:
            j, offset = j + 1, 0
        out.append(dict(shard=j, offset=offset, num_tokens=w["num_tokens"],
                        num_keys=w["num_keys"]))
        offset += w["num_tokens"]
    if j != len(m.shards) - 1 or offset != m.shards[j].num_tokens:
        raise SystemExit(f"{store}: its shards are not the synthetic shards back to back")
    return out


class SyntheticKeys:
    """The keys of a store this script wrote, regenerated from the seed unit by unit (a unit is
    one synthetic shard: ``units[s]`` says where it lies in the store)."""

    def __init__(self, store: Path, m, seed: int):
        self.units = _layout(store, m)
        self.dim = DIM
        self.seed, self.g = seed, _globals(seed)

    def keys(self, st, s: int) -> np.ndarray:
        """float16 [num_tokens, d]: unit ``s``'s keys by position (rows without a key unused)."""
        return synthetic_shard(self.seed, s, self.units[s]["num_tokens"], self.g)[3]


class ArchivedKeys:
    """The keys of any store with a key archive (a real build: ``benchmarks/build_scale.py``),
    read from ``archive.lance`` shard by shard; a unit is one store shard."""

    def __init__(self, store: Path, m):
        from schemas.archive import read_shard_keys

        self.read = read_shard_keys
        self.units = [dict(shard=i, offset=0, num_tokens=info.num_tokens,
                           num_keys=info.num_keys) for i, info in enumerate(m.shards)]
        self.dim = m.dim

    def keys(self, st, s: int) -> np.ndarray:
        unit, info = self.units[s], st.manifest.shards[s]
        pos, keys = self.read(st.path, info)
        # the archive holds a key at every position but each document's last, as the
        # synthetic layout does, so the two sources are measured on the same positions
        if not np.array_equal(np.sort(pos), _key_positions(st, unit)):
            raise SystemExit(f"shard {info.shard_id}: archived positions are not every "
                             "position but each document's last")
        out = np.zeros((unit["num_tokens"], keys.shape[1]), np.float16)
        out[pos] = keys
        return out


def _key_positions(st, where: dict) -> np.ndarray:
    """Positions (in the synthetic shard) that have a key: all but each document's last."""
    sh = st.shards[where["shard"]]
    lo, n = where["offset"], where["num_tokens"]
    ends = sh.doc_ends
    ends = ends[(ends > lo) & (ends <= lo + n)] - lo
    has = np.ones(n, bool)
    has[ends - 1] = False
    return np.flatnonzero(has)


def measure(store: Path, seed: int, queries: int, recall_queries: int, progress: bool,
            archived: bool = False) -> dict:
    """Run in a fresh process: load, latency, RSS, recall. ``archived``: take the keys from the
    store's archive (a real store) instead of regenerating them (a store this script wrote)."""
    import faiss
    from tqdm import tqdm

    import dresd
    from schemas.lists import unpack_ids

    faiss.omp_set_num_threads(1)
    rss0 = rss_anon()
    t0 = time.perf_counter()
    st = dresd.load_store(store)
    load_s = time.perf_counter() - t0
    rss_load = rss_anon()
    m = st.manifest
    source = ArchivedKeys(store, m) if archived else SyntheticKeys(store, m, seed)

    # query locations: a key chosen uniformly (unit by its key count, then a position);
    # `layout` says where each unit lies in the store's shards
    layout = source.units
    rng = np.random.default_rng([seed, 3])
    counts = np.array([w["num_keys"] for w in layout])
    q_shard = rng.choice(len(counts), queries, p=counts / counts.sum())
    q_pos = np.empty(queries, np.int64)  # position in the synthetic shard
    q_vec = np.empty((queries, source.dim), np.float32)
    for s in np.unique(q_shard):
        pos = _key_positions(st, layout[s])
        rows = np.flatnonzero(q_shard == s)
        q_pos[rows] = rng.choice(pos, len(rows))
    q_tok = np.array([int(st.shards[layout[s]["shard"]].tokens[layout[s]["offset"] + p + 1])
                      for s, p in zip(q_shard, q_pos)])
    # pass 1: regenerate each shard's keys and perturb the chosen ones into queries
    for s in tqdm(np.unique(q_shard), desc="queries", disable=not progress):
        keys = source.keys(st, s)
        rows = np.flatnonzero(q_shard == s)
        x = keys[q_pos[rows]].astype(np.float32)
        x += QUERY_NOISE * rng.standard_normal(x.shape, dtype=np.float32)
        q_vec[rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
        del keys
    # reading an archive's keys leaves Arrow's and Lance's allocator pools resident (regenerated
    # keys leave nothing): the queries' own growth is what they add past this
    rss_keys = rss_anon()

    for i in range(min(200, queries)):  # warm-up: first touches of the mapped pages
        st.continuations(q_vec[i], int(q_tok[i]), K)
    lat = np.empty(queries)
    found = np.empty(queries, np.int64)
    hits = []
    for i in range(queries):
        a = time.perf_counter()
        out = st.continuations(q_vec[i], int(q_tok[i]), K)
        lat[i] = time.perf_counter() - a
        found[i] = len(out)
        if i < recall_queries:
            sh, ids, _ = st.search.search(q_vec[i], int(q_tok[i]), K)
            hits.append({(int(s), int(p)) for s, p in zip(sh, unpack_ids(ids)[1])})
    rss_queries = rss_anon()

    # pass 2: exact filtered top-10 over every key followed by the query's token
    r = min(recall_queries, queries)
    best = [[] for _ in range(r)]
    for s in tqdm(range(len(layout)), desc="exact", disable=not progress):
        where = layout[s]
        keys = source.keys(st, s)
        tokens = np.asarray(st.shards[where["shard"]].tokens)[where["offset"]:]
        pos = _key_positions(st, where)
        nxt = tokens[pos + 1]
        order = np.argsort(nxt, kind="stable")
        sorted_nxt = nxt[order]
        for i in range(r):
            lo, hi = np.searchsorted(sorted_nxt, [q_tok[i], q_tok[i] + 1])
            if lo == hi:
                continue
            cand = pos[order[lo:hi]]
            sc = keys[cand].astype(np.float32) @ q_vec[i]
            top = np.argsort(-sc)[:K]
            best[i] += [(float(sc[j]), where["shard"], where["offset"] + int(cand[j]))
                        for j in top]
        del keys
    recalls = []
    for i in range(r):
        exact = {(s, p) for _, s, p in sorted(best[i], reverse=True)[:K]}
        if exact:
            recalls.append(len(exact & hits[i]) / len(exact))
    return dict(
        load_s=load_s, rss_before_mb=rss0 / 2**20, rss_after_load_mb=rss_load / 2**20,
        rss_after_queries_mb=rss_queries / 2**20, rss_after_key_reads_mb=rss_keys / 2**20,
        load_rss_growth_mb=(rss_load - rss0) / 2**20,
        p50_ms=float(np.percentile(lat, 50) * 1e3), p99_ms=float(np.percentile(lat, 99) * 1e3),
        mean_ms=float(lat.mean() * 1e3), queries=queries, full_k_fraction=float(
            (found >= K).mean()), widened=st.search.widened, recall_at_10=float(np.mean(recalls)),
        recall_queries=len(recalls), stats_summary=st.stats.summary(),
        bytes_per_token=st.stats.bytes_per_token, nlist=m.index.nlist, nprobe=m.index.nprobe,
        factory=m.index.factory, shards=len(m.shards), tokens=m.num_tokens, keys=m.num_keys,
    )


# --------------------------------------------------------------------------- report


FIGURES = [
    ("serving_bytes_per_token", "serving bytes/token"),
    ("train_s", "index training (s)"),
    ("fill_cpu_us_per_key", "fill CPU time per key (us)"),
    ("load_s", "load_store (s)"),
    ("rss_after_load_mb", "RssAnon after load (MiB)"),
    ("rss_after_queries_mb", "RssAnon after queries (MiB)"),
    ("p99_ms", "search p99 (ms)"),
    ("recall_at_10", "recall@10 vs exact"),
]


def row_of(n: int, timings: dict, m: dict) -> dict:
    b = m["bytes_per_token"]
    return dict(
        keys=m["keys"], tokens=m["tokens"], shards=m["shards"], nlist=m["nlist"],
        nprobe=m["nprobe"], factory=m["factory"], train_size=timings.get("train_size"),
        bytes_per_token={k: round(v, 3) for k, v in b.items()},
        serving_bytes_per_token=b["serving"],
        archive_bytes_per_token=2 * DIM,  # the archive's float16 keys alone (dropped here)
        with_archive_bytes_per_token=b["serving"] + 2 * DIM,
        write_s=timings.get("write_s"), sample_s=timings.get("sample_s"),
        train_s=timings.get("train_s"), fill_s=timings.get("fill_s"),
        fill_keys_per_s=m["keys"] / timings["fill_s"],
        fill_us_per_key=timings["fill_s"] / m["keys"] * 1e6,
        # CPU time of the (one-threaded) fill: what other jobs on the machine cannot inflate
        fill_cpu_us_per_key=timings["fill_cpu_s"] / m["keys"] * 1e6
        if "fill_cpu_s" in timings else None,
        train_cpu_s=timings.get("train_cpu_s"),
        compact_s=timings.get("compact_s"), compact_cpu_s=timings.get("compact_cpu_s"),
        compacted_from_shards=timings.get("compacted_from_shards"),
        **{k: m[k] for k in ("load_s", "rss_before_mb", "rss_after_load_mb",
                             "rss_after_queries_mb", "load_rss_growth_mb", "p50_ms", "p99_ms",
                             "mean_ms", "queries", "full_k_fraction", "widened",
                             "recall_at_10", "recall_queries", "stats_summary")},
    )


def extrapolate(rows: list[dict], target: float = 1e9) -> dict:
    """Each figure at ``target`` keys: a power law through the two largest sizes (log-log),
    or the one size's value scaled as stated when only one was measured. At each size the
    store with the fewest shards counts (compacted, where measured): search and load time grow
    with the shard count, and a large store is served compacted."""
    fewest = {}
    for r in rows:
        if r["keys"] not in fewest or r["shards"] < fewest[r["keys"]]["shards"]:
            fewest[r["keys"]] = r
    rows = sorted(fewest.values(), key=lambda r: r["keys"])
    out = {}
    for key, _ in FIGURES + [("fill_s", ""), ("p50_ms", "")]:
        pts = [(r["keys"], r[key]) for r in rows if r.get(key)]
        if not pts:
            continue
        if len(pts) == 1:
            n, v = pts[0]
            scale = target / n if key in ("train_s", "fill_s") else 1.0
            out[key] = {"value": v * scale, "method": "linear" if scale != 1 else "constant"}
            continue
        (n1, v1), (n2, v2) = pts[-2], pts[-1]
        e = math.log(v2 / v1) / math.log(n2 / n1) if v1 > 0 and v2 > 0 else 0.0
        out[key] = {"value": v2 * (target / n2) ** e, "method": f"power law, exponent {e:.2f}"}
    return out


def report(rows: list[dict], out: Path) -> str:
    rows = sorted(rows, key=lambda r: (r["keys"], -r["shards"]))
    lines = [f"{'keys':>12} {'shards':>6} {'nlist':>6} {'serve B/t':>9} {'+archive':>8} "
             f"{'train s':>8} {'fill k/s':>9} {'us/key':>7} {'cpu us':>7} {'load s':>7} {'RSS load':>9} "
             f"{'RSS qry':>8} {'p50 ms':>7} {'p99 ms':>7} {'R@10':>6}"]
    for r in rows:
        lines.append(
            f"{r['keys']:>12,} {r['shards']:>6} {r['nlist']:>6} "
            f"{r['serving_bytes_per_token']:>9.2f} {r['with_archive_bytes_per_token']:>8.1f} "
            f"{r['train_s']:>8.1f} {r['fill_keys_per_s']:>9.0f} {r['fill_us_per_key']:>7.1f} "
            f"{r.get('fill_cpu_us_per_key') or float('nan'):>7.1f} "
            f"{r['load_s']:>7.2f} {r['rss_after_load_mb']:>8.0f}M "
            f"{r['rss_after_queries_mb']:>7.0f}M {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} "
            f"{r['recall_at_10']:>6.3f}")
    for r in rows:
        if r.get("compacted_from_shards"):
            lines.append(f"{r['keys']:,} keys compacted from {r['compacted_from_shards']} to "
                         f"{r['shards']} shards by `dresd compact`: {r['compact_s']:.0f} s "
                         f"({r['compact_cpu_s']:.0f} s CPU)")
    lines.append("")
    lines.append("bytes/token by part at the largest size: " + ", ".join(
        f"{k} {v:.2f}" for k, v in rows[-1]["bytes_per_token"].items()))
    ext = extrapolate(rows)
    lines.append("")
    lines.append("extrapolated to 1B keys (from the two largest sizes measured, each with its "
                 "fewest shards):")
    nlist_1b = int(4 * math.sqrt(1e9))
    lines.append(f"  nlist ~ 4 sqrt(N) = {nlist_1b:,} (auto: capped by ~4.2M training keys at "
                 "~107k lists)")
    for key, label in FIGURES + [("fill_s", "fill, whole store (s)"), ("p50_ms", "search p50")]:
        if key in ext:
            v = ext[key]["value"]
            extra = f" = {v / 3600:.1f} h on one thread" if key == "fill_s" else ""
            lines.append(f"  {label:<28} {v:12.3f}  ({ext[key]['method']}){extra}")
    serving = rows[-1]["serving_bytes_per_token"]
    lines.append(f"  serving set at 1B tokens      ~{serving:.1f} GB (+{2 * DIM + 4} GB key "
                 "archive unless built with --no-archive)")
    text = "\n".join(lines)
    out.with_suffix(".txt").write_text(text + "\n")
    _plot(rows, ext, out.with_suffix(".png"))
    return text


def _plot(rows, ext, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    compacted = [r for r in rows if r.get("compacted_from_shards")]
    rows = [r for r in rows if not r.get("compacted_from_shards")]
    n = [r["keys"] for r in rows]
    for ax, (key, label) in zip(axes.flat, FIGURES):
        ax.plot(n, [r[key] for r in rows], "o-", label="measured (as built)")
        if compacted:
            ax.plot([r["keys"] for r in compacted], [r[key] for r in compacted], "s",
                    color="green", label="compacted")
        if key in ext:
            last = (compacted or rows)[-1]
            ax.plot([last["keys"], 1e9], [last[key], ext[key]["value"]], "o:", color="grey",
                    label="extrapolated")
        ax.set_xscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("keys")
        ax.grid(alpha=0.3)
    axes.flat[0].axhline(32, color="red", lw=0.8, ls="--", label="32 B/token budget")
    axes.flat[6].axhline(2, color="red", lw=0.8, ls="--", label="2 ms goal")
    axes.flat[6].legend(fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("dresd scale benchmark: synthetic stores through the real writers "
                 f"({platform.machine()}, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="1e6", help="comma-separated store sizes, e.g. 1e6,1e7,1e8")
    ap.add_argument("--shard-tokens", type=float, default=1e6)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--recall-queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "scale"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--remove", action="store_true", help="delete each store after measuring")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--build-only", action="store_true",
                    help="write the stores and stop; a later run without it measures them "
                         "(so the timed queries can wait for a quiet machine)")
    ap.add_argument("--compact-tokens", type=float, default=None,
                    help="measure a compacted copy of each store (hard links, then `dresd "
                         "compact --shard-tokens N`) instead of the store as built")
    ap.add_argument("--measure", default=None, metavar="STORE",
                    help="only measure STORE (in this process) and print its figures as JSON")
    ap.add_argument("--archived", action="store_true",
                    help="with --measure: STORE is any store with a key archive (a real build); "
                         "queries and the exact search take its archived keys")
    args = ap.parse_args(argv)
    progress = not args.no_progress
    shard_tokens = int(args.shard_tokens)
    if args.measure:
        print("RESULT " + json.dumps(measure(Path(args.measure), args.seed, args.queries,
                                             args.recall_queries, progress, args.archived)))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = {(r["keys"], r["shards"]): r for r in previous["rows"]}
    for n in (int(float(x)) for x in args.keys.split(",")):
        store = Path(args.workdir) / f"scale-{n:.0e}".replace("+", "")
        est = n * 30e-6 + n / 1e6 * 6  # fill ~24 us/key at 1M, plus writing and measuring
        print(f"== {n:,} keys -> {store} (build ~{est / 60:.0f} min on one thread, measured "
              "at 1M; progress bars show the rest)", flush=True)
        timings = build(store, n, shard_tokens, args.seed, progress)
        if args.build_only:
            print(f"built {store}: {timings}", flush=True)
            continue
        if args.compact_tokens:
            store, compaction = compacted_copy(store, int(args.compact_tokens))
            timings = {**timings, **compaction}
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(store), "--seed", str(args.seed),
             "--shard-tokens", str(shard_tokens), "--queries", str(args.queries),
             "--recall-queries", str(args.recall_queries)]
            + (["--no-progress"] if not progress else []),
            stdout=subprocess.PIPE, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        m = json.loads(next(line for line in child.stdout.splitlines()
                            if line.startswith("RESULT "))[7:])
        row = row_of(n, timings, m)
        rows[row["keys"], row["shards"]] = row
        print(row["stats_summary"])
        data = {"meta": {"machine": platform.machine(), "processor": platform.processor(),
                         "python": platform.python_version(), "threads": 1,
                         "shard_tokens": shard_tokens, "seed": args.seed,
                         "synthetic": {"vocab": VOCAB, "dim": DIM, "centres": CENTRES,
                                       "centres_per_token": CENTRES_PER_TOKEN,
                                       "noise_norm": 0.6, "query_noise_norm": 0.3}},
                "rows": sorted(rows.values(), key=lambda r: (r["keys"], -r["shards"]))}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, out)
        print(report(data["rows"], out), flush=True)
        if args.remove:
            import shutil

            shutil.rmtree(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
