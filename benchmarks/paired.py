"""Paired per-prompt comparison of two methods in one decode run (benchmarks/decode.py's JSON).

For every prompt both decoded, the log ratio of tokens per second (first method over the other);
prints their mean, its standard error and the prompts where the first method was faster. Pairing
by prompt removes what the prompts themselves contribute (some are far easier to draft for than
others), so the standard error is that of the difference, not of either speed.

    python benchmarks/paired.py benchmarks/results/decode-cpu-id-40-node-model.json \\
        hybrid/id/calibrated rest+pl/id/calibrated suffix/id/4x8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode import Run  # noqa: E402  (the labels the decode tables print)


def speeds(records: list[dict]) -> dict[str, dict[int, float]]:
    """label (method/store/budget, as the tables print it) -> prompt -> tokens per second."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        label = Run(r["method"], r["store"], r["budget"]).label
        out.setdefault(label, {})[r["prompt"]] = r["tokens"] / r["seconds"]
    return out


def paired(first: dict[int, float], other: dict[int, float]) -> tuple[float, float, int, int]:
    """(mean log ratio, its standard error, prompts where ``first`` is faster, prompts)."""
    prompts = sorted(set(first) & set(other))
    if len(prompts) < 2:
        raise ValueError(f"{len(prompts)} prompt(s) decoded by both: a standard error needs 2")
    ratios = np.array([math.log(first[p] / other[p]) for p in prompts])
    return (float(ratios.mean()), float(ratios.std(ddof=1) / math.sqrt(len(ratios))),
            int((ratios > 0).sum()), len(ratios))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="a JSON file of benchmarks/decode.py")
    ap.add_argument("method", help="label of the first method, e.g. hybrid/id/calibrated")
    ap.add_argument("others", nargs="+", help="labels to compare it with")
    args = ap.parse_args(argv)
    table = speeds(json.loads(args.results.read_text())["records"])
    for label in [args.method, *args.others]:
        if label not in table:
            ap.error(f"{args.results} has no method {label!r}; it has: {', '.join(sorted(table))}")
    for label in args.others:
        mean, se, wins, n = paired(table[args.method], table[label])
        print(f"{args.method} vs {label}: {mean:+.3f} (SE {se:.3f}, faster on {wins}/{n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
