"""The default against its rivals under each saved verify-cost curve (issue 30's replay tables).

    .venv/bin/python benchmarks/regimes.py                            # every family x curve
    .venv/bin/python benchmarks/regimes.py --families errors --curves h200-float32
    .venv/bin/python benchmarks/regimes.py --report                   # tables of what is saved

For each prompt family (benchmarks.prompts.FAMILIES) and each curve in benchmarks/cost_curves/,
``benchmarks/replay.py`` replays all 40 evaluation prompts on the family's in-domain store with
the default (``hybrid``) and the two rivals, REST + prompt lookup and SuffixDecoding, each at
every budget ``benchmarks/decode.py`` runs it at (the calibrated budget, where the method has
one, and the fixed ones). Each method's best budget is the one with the highest modelled
speedup over the 40 prompts (chosen on the same prompts, for every method alike). The lead is
the paired mean log ratio of the default's per-prompt modelled speedup over the best rival's,
with its standard error; the issue's target is a lead of at least log(1.1) = 0.095.

A replay is a model, not a measurement of decoding: verify passes cost what the curve says and
drafting costs what it took here (benchmarks/replay.py). It measures drafting time, so it too
needs a quiet machine. Replays are saved under ``runs/replay/regimes/`` and the tables in
``benchmarks/results/regimes.{json,txt}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode import METHODS  # noqa: E402
from benchmarks.prompts import EVAL_PROMPTS, FAMILIES  # noqa: E402

CURVES = Path(__file__).resolve().parent / "cost_curves"
RESULTS = Path(__file__).resolve().parent / "results" / "regimes"
REPLAYS = Path(__file__).resolve().parent.parent / "runs" / "replay" / "regimes"
DEFAULT = "hybrid"
RIVALS = ("rest+pl", "suffix")
TARGET = math.log(1.1)


def runs() -> list[str]:
    """method:budget of every replayed run."""
    return [f"{m}:{b}" for m in (DEFAULT, *RIVALS) for b in METHODS[m][1]]


def replay_path(family: str, curve: str) -> Path:
    return REPLAYS / f"{family}-{curve}.json"


def run_replay(family: str, curve: str) -> None:
    from benchmarks import replay

    replay.main(["--family", family, "--prompts", f"0-{EVAL_PROMPTS - 1}", "--stores", "id",
                 "--runs", ",".join(runs()), "--cost", str(CURVES / f"{curve}.json"),
                 "--out", str(replay_path(family, curve))])


def best(results: dict, method: str) -> tuple[str, dict]:
    """(label, summary) of the method's budget with the highest modelled speedup."""
    mine = {k: v for k, v in results.items() if k.split("/")[0] == method}
    if not mine:
        raise KeyError(f"no replay of {method} in these results")
    label = max(mine, key=lambda k: mine[k]["modelled_speedup"])
    return label, mine[label]


def paired_log_ratio(first: list[float], other: list[float]) -> tuple[float, float]:
    """(mean, standard error) of log(first / other) over prompts."""
    d = np.log(np.asarray(first)) - np.log(np.asarray(other))
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def regime_row(family: str, curve: str, results: dict) -> dict:
    row = {"family": family, "curve": curve}
    for method in (DEFAULT, *RIVALS):
        label, s = best(results, method)
        row[method] = {"label": label, "budget": label.split("/")[-1],
                       "speedup": s["modelled_speedup"], "AL": s["AL"],
                       "per_prompt": s["per_prompt_speedup"]}
    rival = max(RIVALS, key=lambda m: row[m]["speedup"])
    mean, se = paired_log_ratio(row[DEFAULT]["per_prompt"], row[rival]["per_prompt"])
    row.update(best_rival=rival, lead=mean, lead_se=se, target_met=mean >= TARGET)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'family':10s} {'curve':28s} {'default (budget)':>22s} {'REST+PL (budget)':>22s} "
            f"{'Suffix (budget)':>22s}  lead over best rival (paired log ratio +- SE)")
    lines = [head]
    for r in rows:
        cells = [f"{r[m]['speedup']:.2f} ({r[m]['budget']})" for m in (DEFAULT, *RIVALS)]
        lines.append(f"{r['family']:10s} {r['curve']:28s} {cells[0]:>22s} {cells[1]:>22s} "
                     f"{cells[2]:>22s}  {r['lead']:+.3f} +- {r['lead_se']:.3f} vs "
                     f"{r['best_rival']} ({'met' if r['target_met'] else 'MISSED'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--curves", default=",".join(sorted(p.stem for p in CURVES.glob("*.json"))))
    ap.add_argument("--report", action="store_true", help="only tabulate the saved replays")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    curves = [c for c in args.curves.split(",") if c]
    for family in families:
        if family not in FAMILIES:
            ap.error(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    for curve in curves:
        if not (CURVES / f"{curve}.json").exists():
            ap.error(f"no curve {curve!r} in {CURVES}")
    rows = []
    for family in families:
        for curve in curves:
            path = replay_path(family, curve)
            if not args.report and not path.exists():
                run_replay(family, curve)
            if path.exists():
                rows.append(regime_row(family, curve, json.loads(path.read_text())["results"]))
    text = table(rows)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps({"runs": runs(), "rows": rows}, indent=1))
    RESULTS.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
