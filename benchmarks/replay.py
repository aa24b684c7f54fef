"""Acceptance replay: drafters driven over the model's own greedy outputs, without verify passes.

Greedy decoding is lossless, so every method commits the same tokens: the autoregressive output.
Given that output and the final hidden states of one forward over prompt + output, a drafter can
be driven step by step exactly as ``dresd.decode`` drives it (``begin``, ``propose_tree``,
``accept``, ``verified``), and the accepted path of each step read off the known output instead
of a verify pass. A step's verify cost is the device's saved calibration curve (``dresd
calibrate``) for its tree size, so the calibrated budget sees the same costs in every run: the
replay is deterministic up to float noise in the hidden states and the measured drafting times,
and 40 prompts take minutes instead of the half hour a timed decode run takes.

What it measures, per method:
- AL and the modelled speedup: autoregressive cost, (tokens - 1) one-token passes, over the
  replay's verify costs plus its measured drafting time (prefill excluded from both);
- where acceptance goes, per step: the oracle's depth (the draft length: every step could have
  accepted that many), the depth the candidates offered (the longest prefix of the output among
  the composite's candidate nodes, before the budget chose any), and the depth the verified tree
  accepted. Their gaps are the drafting loss (no source had the tokens) and the selection loss
  (a source had them, the budget did not verify them), plus wasted nodes per step;
- per source (composites): tree nodes, accepted tokens (tokens the source had proposed that the
  tree accepted; sources that proposed the same token each count it), shadow hit rate.

It is a tool for design and A/B checks, not a benchmark: speed claims come from
``benchmarks/decode.py``, which times real verify passes. Greedy references are cached under
``runs/replay/``.

    python benchmarks/replay.py --prompts 8-23 --runs hybrid:calibrated,rest+pl:calibrated
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpora import RUNS, id_store, requests_store  # noqa: E402
from benchmarks.decode import (  # noqa: E402
    BUDGETS,
    CALIBRATED,
    DRAFTERS,
    HOWTO_PROMPTS,
    ID_PROMPTS,
    WARMUP_REQUEST,
    WARMUP_TOKENS,
    hf_generate,
)
from benchmarks.oracle import SelectionOracle  # noqa: E402
from benchmarks.prompts import EVAL_PROMPTS, FAMILIES  # noqa: E402
from dresd.calibrate import Calibration  # noqa: E402
from dresd.decode import DecodeConfig, as_drafter, encode_prompt  # noqa: E402
from dresd.drafters.base import DraftRequest  # noqa: E402
from dresd.drafters.composite import CompositeDrafter  # noqa: E402
from dresd.models import load_model  # noqa: E402
from dresd.store import load_store  # noqa: E402
from dresd.tree import DraftTree, model_forward  # noqa: E402
from schemas.atomic import write_text_atomic  # noqa: E402

REPLAY = RUNS / "replay"


def greedy_reference(model, model_name: str, ids: list[int], max_new_tokens: int) -> list[int]:
    """The autoregressive output for ``ids``, cached by model, prompt and length."""
    key = hashlib.sha256(json.dumps([model_name, str(model.dtype), ids, max_new_tokens])
                         .encode()).hexdigest()[:24]
    path = REPLAY / "references" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    out, _ = hf_generate(model, ids, max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(out))
    return out


@torch.inference_mode()
def final_states(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), H]: row t is the final state that predicts token t + 1."""
    from transformers import DynamicCache

    x = torch.tensor([tokens], device=model.device)
    return model_forward(model, x, DynamicCache(), logits_to_keep=1).hidden


@dataclasses.dataclass
class StepRecord:
    tree: int  # nodes below the root
    accepted: int  # draft tokens the tree accepted
    offered: int  # depth of the output's prefix among the candidates (-1: not a composite)
    reachable: int  # draft tokens the oracle would have had accepted (the draft length cut)
    expected: float  # the composite's estimate of the tree's accepted tokens (-1: none)
    drafting_s: float
    cost_s: float  # the calibration's verify cost for the tree


def replay(drafter, ids: list[int], out: list[int], hidden: torch.Tensor, config: DecodeConfig,
           vocab: int, cost) -> list[StepRecord]:
    """Drive ``drafter`` over the known output as dresd.decode would; one record per step."""
    text = ids + out
    drafter.begin(ids, hidden[: len(ids)])
    budget0 = config.tree_budget
    records = []
    p = len(ids)  # index of y in ``text``
    while p < len(text) - 1:
        committed = p - len(ids) + 1
        remaining = config.max_new_tokens - committed
        budget = dataclasses.replace(budget0, draft_len=min(budget0.draft_len, remaining - 1))
        t = time.perf_counter()
        tree = DraftTree(text[p])
        if budget.draft_len > 0 and budget.num_drafts > 0:
            request = DraftRequest(text[: p + 1], hidden[p - 1], budget.num_drafts,
                                   budget.draft_len)
            tree = drafter.propose_tree(request, budget, vocab)
        truth = text[p + 1 : p + 1 + max(budget.draft_len, 0)]
        node, accepted = 0, []
        for tok in truth:
            node = tree.children(node).get(tok)
            if node is None:
                break
            accepted.append(tok)
        offered, expected = -1, -1.0
        composite = getattr(drafter, "composite", drafter)  # a SelectionOracle's own composite
        if isinstance(composite, CompositeDrafter):  # 0 and 0 when it was not asked
            paths = composite.open_candidates()
            expected = composite.expected[-1] if paths is not None else 0.0
            offered = max((len(path) for path in paths or ()
                           if path == tuple(truth[: len(path)])), default=0)
        drafter.accept([text[p]] + accepted, hidden[p : p + 1 + len(accepted)])
        seconds = float(cost(len(tree)))
        drafter.verified(len(tree), seconds)
        records.append(StepRecord(len(tree) - 1, len(accepted), offered, len(truth),
                                  expected, time.perf_counter() - t, seconds))
        p += len(accepted) + 1
    return records


def parse_prompts(spec: str) -> list[int]:
    """'8-23' or '0,3,5' or '40' (the first 40)."""
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        return list(range(lo, hi + 1))
    if "," in spec:
        return [int(x) for x in spec.split(",")]
    return list(range(int(spec)))


def _bin(records: list[StepRecord]) -> tuple[int, float, float]:
    """(steps, mean estimated accepted tokens, mean accepted tokens)."""
    if not records:
        return 0, 0.0, 0.0
    return (len(records), float(np.mean([r.expected for r in records])),
            float(np.mean([r.accepted for r in records])))


def summarize(records: list[StepRecord], ar_passes: int, ar_cost: float) -> dict:
    """Totals over a method's steps; ``ar_passes``: the one-token passes autoregressive decoding
    needs for the same outputs (each output's length - 1)."""
    steps = len(records)
    emitted = sum(r.accepted + 1 for r in records)
    composite = records and records[0].offered >= 0
    drafted = [r for r in records if r.tree > 0]
    out = dict(
        steps=steps, AL=emitted / steps if steps else 0.0,
        modelled_speedup=ar_passes * ar_cost / sum(r.cost_s + r.drafting_s for r in records),
        mean_tree=float(np.mean([r.tree for r in records])),
        drafting_ms_per_step=1e3 * float(np.mean([r.drafting_s for r in records])),
        steps_root_only=1 - len(drafted) / steps,
        accepted_per_step=float(np.mean([r.accepted for r in records])),
        wasted_nodes_per_step=float(np.mean([r.tree - r.accepted for r in records])),
        reachable_per_step=float(np.mean([r.reachable for r in records])),
    )
    if composite:
        out.update(
            offered_per_step=float(np.mean([r.offered for r in records])),
            steps_nothing_offered=float(np.mean([r.offered == 0 for r in records])),
            steps_offered_not_verified=float(np.mean([r.offered > r.accepted for r in records])),
            expected_per_step=float(np.mean([r.expected for r in records])),
            # root-only steps whose candidates held the next tokens: what the budget refused
            root_only_offered=sum(r.tree == 0 and r.offered > 0 for r in records) / steps,
            root_only_offered_depth=float(np.mean([r.offered for r in records if r.tree == 0]
                                                  or [0])),
            # steps filed by the tree's estimated accepted tokens: (steps, mean estimate, mean
            # accepted); a calibrated estimate has the two means equal in every bin
            by_estimate={f"{lo}-{hi}": _bin([r for r in records if lo <= r.expected < hi])
                         for lo, hi in ((0, 0.25), (0.25, 0.5), (0.5, 1), (1, 2), (2, 4),
                                        (4, 99))},
        )
    depth = defaultdict(lambda: [0, 0, 0])  # depth -> steps accepted >= d, offered >= d, reach
    for r in records:
        for d in range(1, r.reachable + 1):
            depth[d][0] += r.accepted >= d
            depth[d][1] += r.offered >= d
            depth[d][2] += 1
    out["by_depth"] = {d: dict(accepted=a / n, offered=o / n if composite else None)
                       for d, (a, o, n) in sorted(depth.items())}
    return out


def replay_method(drafter, prompts: list[list[int]], prepare, config: DecodeConfig, vocab: int,
                  cal, warm=None, select_right: bool = False) -> dict:
    """One method over every prompt: its summary, with per-source totals for a composite.
    ``prepare(ids)`` gives (ids, greedy output, final states); it runs right before each
    prompt's replay, as a model forward runs before each step's drafting in decoding (the
    calibrated budget weighs the drafting time it measures, and a forward in between changes
    it). ``warm``: the prepared warm-up request of WARMUP_TOKENS, replayed first, unscored.
    ``select_right``: a composite's trees are cut to the right candidate path (SelectionOracle)."""
    def chooser(ids, ref):
        return SelectionOracle(drafter, len(ids), ref) if select_right else drafter

    if warm is not None:
        replay(chooser(*warm[:2]), *warm,
               dataclasses.replace(config, max_new_tokens=WARMUP_TOKENS), vocab, cal.cost)
    records, ar_passes, sources = [], 0, defaultdict(lambda: defaultdict(float))
    per_prompt = []  # each prompt's modelled speedup, for paired comparisons (regimes.py)
    for prompt in prompts:
        ids, ref, hidden = prepare(prompt)
        mine = replay(chooser(ids, ref), ids, ref, hidden, config, vocab, cal.cost)
        records += mine
        ar_passes += len(ref) - 1
        if mine:
            per_prompt.append((len(ref) - 1) * float(cal.cost(1))
                              / sum(r.cost_s + r.drafting_s for r in mine))
        if isinstance(drafter, CompositeDrafter):
            drafter.settle()  # its per-generation counters restart at the next begin
            for name, s in drafter.source_summary().items():
                for k in ("tree_nodes", "accepted", "predicted", "calls", "seconds"):
                    sources[name][k] += s[k]
    summary = summarize(records, ar_passes, float(cal.cost(1)))
    summary["sources"] = {k: dict(v) for k, v in sources.items()}
    summary["per_prompt_speedup"] = per_prompt
    return summary


def report(label: str, summary: dict) -> str:
    """A few lines of a method's summary for the terminal."""
    lines = []
    if "by_estimate" in summary:
        lines.append(f"  root-only steps {summary['steps_root_only']:.2f}, with the next token "
                     f"offered {summary['root_only_offered']:.2f}, offered depth "
                     f"{summary['root_only_offered_depth']:.2f}")
        lines.append("  estimate bins (steps, estimated, accepted): " + "  ".join(
            f"{k}: {n} {e:.2f}/{a:.2f}" for k, (n, e, a) in summary["by_estimate"].items()))
    src = " ".join(f"{k}:{v['accepted']:.0f}/{v['tree_nodes']:.0f}"
                   for k, v in summary["sources"].items())
    lines.append(f"{label:34s} AL {summary['AL']:.3f} model-x {summary['modelled_speedup']:.3f}"
                 f" tree {summary['mean_tree']:.1f} acc {summary['accepted_per_step']:.2f}"
                 f" offered {summary.get('offered_per_step', float('nan')):.2f}"
                 f" reach {summary['reachable_per_step']:.2f} draft "
                 f"{summary['drafting_ms_per_step']:.1f} ms  {src}")
    return "\n".join(lines)


def pairs(spec: str, sep: str) -> list[tuple[str, str]]:
    """'a=1<sep>b=2' as [(a, '1'), (b, '2')]."""
    return [tuple(x.split("=", 1)) for x in spec.split(sep) if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--family", choices=tuple(FAMILIES), default="humaneval")
    ap.add_argument("--prompts", default="8-23",
                    help="evaluation prompt indices: '8-23' (the tuning prompts), '0,5' or 'N' "
                         "(the first N)")
    ap.add_argument("--runs", default="hybrid:calibrated,rest+pl:calibrated",
                    help="method:budget pairs; methods and budgets of benchmarks/decode.py")
    ap.add_argument("--stores", default="id",
                    help="'id' and/or 'id-ivf_flat' (the same store with float keys), or store "
                         "directories (a name with a '/')")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--warmup", choices=("on", "off"), default="on")
    ap.add_argument("--set", default="",
                    help="DecodeConfig overrides for every run, e.g. 'num_drafts=4,draft_len=8'")
    ap.add_argument("--composite", default="",
                    help="CompositeDrafter keyword arguments (JSON values, ';'-separated), "
                         "e.g. 'tree_decay=0.95;score_bands=[0.7,0.9]'")
    ap.add_argument("--drafting-ms", type=float, default=None,
                    help="the drafting time per step a composite's budget weighs, fixed instead "
                         "of measured, so repeated runs choose the same trees (the measured one "
                         "moves the modelled speedup by ~1%%); the speedup still counts the "
                         "measured time")
    ap.add_argument("--select-right", action="store_true",
                    help="cut each composite's tree to the deepest candidate path the output "
                         "follows (benchmarks.oracle.SelectionOracle): the best any budget could "
                         "do with its sources' candidates; labels end in /right")
    ap.add_argument("--cost", default="",
                    help="a saved cost curve (a `dresd calibrate` JSON, e.g. "
                         "benchmarks/cost_curves/h200-float32.json) to replay against instead "
                         "of this device's: each step's verify cost and the curve the "
                         "calibrated budget chooses by")
    ap.add_argument("--out", default="", help="JSON results (default runs/replay/<tag>.json)")
    args = ap.parse_args(argv)

    family = FAMILIES[args.family]
    indices = parse_prompts(args.prompts)
    if not indices or max(indices) >= EVAL_PROMPTS or min(indices) < 0:
        ap.error(f"prompt indices must lie in 0..{EVAL_PROMPTS - 1}")
    texts = family.eval_prompts(EVAL_PROMPTS)
    messages = family.messages
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    stores = {}
    for name in args.stores.split(","):
        build = {"index_kind": name.split("-", 1)[1]} if "-" in name else {}
        if "/" in name:  # a store directory of one's own (e.g. built from part of a corpus)
            path = Path(name)
        else:
            path = (requests_store(args.model, family.name, HOWTO_PROMPTS, **build)
                    if family.store_prompts
                    else id_store(args.model, ID_PROMPTS, **build))
        stores[name] = load_store(path, model, tokenizer)
    from dresd.budget import calibrated_budget, use_calibration

    if args.cost:  # another device's curve: the verify costs and the calibrated budget's
        use_calibration(model, Calibration.load(args.cost))
    cal = calibrated_budget(model, tokenizer).calibration
    overrides = {k: type(getattr(DecodeConfig(), k))(v) for k, v in pairs(args.set, ",")}
    attributes = {k: json.loads(v) for k, v in pairs(args.composite, ";")}
    if args.drafting_ms is not None:
        attributes.setdefault("drafting_s", args.drafting_ms / 1e3)

    def prepared(ids, max_new=args.max_new_tokens):
        """(ids, the greedy output (cached on disk), the final states of both)."""
        ref = greedy_reference(model, args.model, ids, max_new)
        return ids, ref, final_states(model, ids + ref)

    warm = prepared(encode_prompt(tokenizer, WARMUP_REQUEST), WARMUP_TOKENS)
    prompts = [encode_prompt(tokenizer, messages(texts[i])) for i in indices]
    results = {}
    for store_name, store in stores.items():
        for method, budget in (tuple(r.split(":")) for r in args.runs.split(",") if r):
            policy = "calibrated" if budget == CALIBRATED else "fixed"
            config = DecodeConfig(max_new_tokens=args.max_new_tokens, drafter=DRAFTERS[method],
                                  budget=policy, **{**BUDGETS.get(budget, {}), **overrides})
            drafter = as_drafter(store, config, model, tokenizer)
            if isinstance(drafter, CompositeDrafter):  # estimates of its own (decode.py's cold)
                drafter = CompositeDrafter(drafter.drafters, drafter.policy, memory={},
                                           **attributes)
            right = args.select_right and isinstance(drafter, CompositeDrafter)
            label = f"{method}/{store_name}/{budget}" + ("/right" if right else "")
            results[label] = replay_method(drafter, prompts, prepared, config, vocab, cal,
                                           warm if args.warmup == "on" else None, right)
            print(report(label, results[label]), flush=True)
    curve = f"-{Path(args.cost).stem}" if args.cost else ""
    tag = (f"{args.family}-{args.prompts}-{args.stores}{curve}".replace(",", "+")
           .replace("/", "_"))
    out = Path(args.out) if args.out else REPLAY / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(dict(args=vars(args), results=results), indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
