"""``dresd info STORE``: generations, shards, counts, and bytes per token on disk.

Bytes per token are split the way the store is. The serving set, what the runtime maps or reads:
values (token streams), index (inverted lists: compressed key codes and packed ids), docs
(document tables) and shared (transform and quantizer, once per store). The archive: the float16
keys in ``archive.lance`` (kept unless built with ``--no-archive``), which the runtime never opens
and ``dresd reindex`` builds a new index from.
"""

from __future__ import annotations

import json

from schemas import list_generations, read_manifest
from schemas.manifest import current_generation

PARTS = ("values", "index", "docs", "shared", "serving", "archive", "total")


def describe(store: str, generation: int | None = None) -> dict:
    """Everything ``info`` prints, as one JSON-ready dict."""
    live = current_generation(store)
    manifest = read_manifest(store, generation)
    sizes = manifest.storage_bytes()
    per_token = max(manifest.num_tokens, 1)
    generations = []
    for g in list_generations(store):
        m = read_manifest(store, g)
        generations.append({
            "generation": g, "current": g == live, "created": m.created, "note": m.note,
            "parent": m.parent_generation, "shards": len(m.shards), "docs": m.num_docs,
            "tokens": m.num_tokens, "keys": m.num_keys,
        })
    return {
        "store": str(store),
        "generation": manifest.generation,
        "model": {"name": manifest.model.name, "type": manifest.model.model_type,
                  "hidden_size": manifest.model.hidden_size,
                  "fingerprint": manifest.model.fingerprint},
        "layer": manifest.layer,
        "dim": manifest.dim,
        "value_len": manifest.value_len,
        "transform": {"sample_size": manifest.transform.sample_size,
                      "explained_variance": manifest.transform.explained_variance},
        "index": {"kind": manifest.index.kind, "factory": manifest.index.factory,
                  "nlist": manifest.index.nlist, "nprobe": manifest.index.nprobe,
                  "pq_m": manifest.index.pq_m, "pq_nbits": manifest.index.pq_nbits,
                  "code_size": manifest.index.code_size,
                  "train_size": manifest.index.train_size},
        "docs": manifest.num_docs,
        "tokens": manifest.num_tokens,
        "keys": manifest.num_keys,
        "bytes": sizes,
        "archive": ({"path": manifest.archive.path, "version": manifest.archive.version,
                     "rows": manifest.archive.rows} if manifest.archive else None),
        "bytes_per_token": {k: v / per_token for k, v in sizes.items()},
        "generations": generations,
        "shards": [{"shard_id": s.shard_id, "generation_added": s.generation_added,
                    "docs": s.num_docs, "tokens": s.num_tokens, "keys": s.num_keys,
                    "bytes": sum(f.bytes for f in s.files())}
                   for s in manifest.shards],
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_info(d: dict) -> str:
    lines = [
        f"store       {d['store']}",
        f"generation  {d['generation']}",
        f"model       {d['model']['name']} ({d['model']['type']}, hidden {d['model']['hidden_size']}, "
        f"fingerprint {d['model']['fingerprint'][:16]})",
        f"keys        layer {d['layer']}, d={d['dim']}, values N={d['value_len']}, transform fit on "
        f"{d['transform']['sample_size']} states (explained variance "
        f"{d['transform']['explained_variance']:.3f})",
        f"index       {d['index']['factory'] or d['index']['kind']} nlist={d['index']['nlist']} "
        f"nprobe={d['index']['nprobe']}, {d['index']['code_size']}-byte codes, trained on "
        f"{d['index']['train_size']} keys",
        f"contents    {d['docs']} documents, {d['tokens']} tokens, {d['keys']} keys, "
        f"{len(d['shards'])} shards",
        "",
        f"{'on disk':<10}{'bytes':>14}{'per token':>12}",
    ]
    for part in PARTS:
        if part == "serving":
            lines.append("-" * 36)
        lines.append(f"{part:<10}{_mib(d['bytes'][part]):>14}{d['bytes_per_token'][part]:>12.2f}")
    b = d["bytes_per_token"]
    archive = d.get("archive")
    lines.append(f"serving set {b['serving']:.1f} bytes/token (what the runtime maps); key "
                 + (f"archive {b['archive']:.1f} ({archive['path']} version {archive['version']}, "
                    f"{archive['rows']} keys); total {b['total']:.1f}" if archive
                    else "archive: none kept (built with --no-archive)"))
    lines += ["", f"{'gen':>4} {'':1} {'shards':>6} {'docs':>8} {'tokens':>10} {'keys':>10}  note"]
    for g in d["generations"]:
        mark = "*" if g["current"] else ""
        lines.append(f"{g['generation']:>4} {mark:1} {g['shards']:>6} {g['docs']:>8} "
                     f"{g['tokens']:>10} {g['keys']:>10}  {g['note']}")
    lines += ["", f"{'shard':<20} {'gen':>4} {'docs':>8} {'tokens':>10} {'keys':>10} {'size':>12}"]
    for s in d["shards"]:
        lines.append(f"{s['shard_id']:<20} {s['generation_added']:>4} {s['docs']:>8} "
                     f"{s['tokens']:>10} {s['keys']:>10} {_mib(s['bytes']):>12}")
    return "\n".join(lines)


def run(args) -> int:
    d = describe(args.store, args.generation)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a store: generations, shards, bytes per token")
    p.add_argument("store", help="store directory")
    p.add_argument("--generation", type=int, default=None, help="a generation other than CURRENT")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)
