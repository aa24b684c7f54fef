#!/usr/bin/env bash
# Behaviour unchanged? The same ~30k-token standard-library store built by an earlier commit's
# code and by this checkout's, compared file by file through their manifests, then the
# acceptance replay (benchmarks/replay.py, fixed drafting time, the saved verify-cost curve)
# of both codes over this checkout's store: AL, trees and per-source counts must be equal;
# only measured drafting time (and the modelled speedup that counts it) may differ.
#
#   bash benchmarks/before_after.sh OLD_COMMIT [OUT_DIR]     (default OUT_DIR /tmp/dresd-before-after)
#
# Run it on a quiet machine after `dresd calibrate` (both codes read the same saved curve).
set -euo pipefail
OLD_REV=${1:?usage: before_after.sh OLD_COMMIT [OUT_DIR]}
OUT=${2:-/tmp/dresd-before-after}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
mkdir -p "$OUT"
rm -rf "$OUT/old-code"
git -C "$HERE" worktree add -f --detach "$OUT/old-code" "$OLD_REV" >/dev/null
trap 'git -C "$HERE" worktree remove --force "$OUT/old-code"' EXIT

build() {  # $1 code root, $2 output root: prints the store directory
  (cd "$1" && PYTHONPATH="$1" "$PY" -c "
from pathlib import Path
from benchmarks.corpora import ood_store
print(ood_store('default', 30000, root=Path('$2'), sample_size=4096))" | tail -1)
}
replay() {  # $1 code root, $2 store, $3 result file
  (cd "$1" && PYTHONPATH="$1" "$PY" benchmarks/replay.py --stores "$2" --prompts 6 \
     --max-new-tokens 64 --drafting-ms 2 --runs hybrid:calibrated,rest+pl:calibrated --out "$3")
}
OLD_STORE=$(build "$OUT/old-code" "$OUT/old")
NEW_STORE=$(build "$HERE" "$OUT/new")
replay "$OUT/old-code" "$NEW_STORE" "$OUT/replay-old.json" > "$OUT/replay-old.txt"
replay "$HERE" "$NEW_STORE" "$OUT/replay-new.json" > "$OUT/replay-new.txt"
"$PY" - "$OLD_STORE" "$NEW_STORE" "$OUT/replay-old.json" "$OUT/replay-new.json" <<'PY'
import json
import sys
from pathlib import Path

import pyarrow.ipc as ipc


def manifest(store):
    return json.loads(sorted((Path(store) / "manifests").glob("gen-*.json"))[-1].read_text())


def docs(m, store):  # the document tables without the corpus paths (each build has its own)
    out = []
    for s in m["shards"]:
        t = ipc.open_file(Path(store) / s["docs"]["path"]).read_all().drop_columns(["source"])
        out.append(t.to_pylist())
    return sorted(map(str, out))


old, new = manifest(sys.argv[1]), manifest(sys.argv[2])
checks = {
    "documents, tokens, keys": lambda m, st: [sum(s[k] for s in m["shards"])
                                              for k in ("num_docs", "num_tokens", "num_keys")],
    "transform (sha256)": lambda m, st: m["transform"]["file"]["sha256"],
    "quantizer (sha256)": lambda m, st: m["index"]["quantizer"]["sha256"],
    "token streams (sha256)": lambda m, st: sorted(s["tokens"]["sha256"] for s in m["shards"]),
    "inverted lists (sha256)": lambda m, st: sorted(s["index"]["sha256"] for s in m["shards"]),
    "key counts (sha256)": lambda m, st: sorted(s["counts"]["sha256"] for s in m["shards"]),
    "document tables but paths": docs,
}
same = True
for name, get in checks.items():
    ok = get(old, sys.argv[1]) == get(new, sys.argv[2])
    same &= ok
    print(f"store  {name:28s} {'same' if ok else 'DIFFERENT'}")
timed = ("drafting_ms_per_step", "modelled_speedup", "seconds")


def untimed(x):
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in timed}
    return x


ro, rn = (json.load(open(p))["results"] for p in sys.argv[3:5])
for run in ro:
    a, b = untimed(ro[run]), untimed(rn[run])
    same &= a == b
    print(f"replay {run}: AL {ro[run]['AL']:.3f} vs {rn[run]['AL']:.3f}, everything but timings "
          f"{'same' if a == b else 'DIFFERENT'} (modelled speedup {ro[run]['modelled_speedup']:.3f}"
          f" vs {rn[run]['modelled_speedup']:.3f}, drafting "
          f"{ro[run]['drafting_ms_per_step']:.2f} vs {rn[run]['drafting_ms_per_step']:.2f} ms)")
sys.exit(0 if same else 1)
PY
