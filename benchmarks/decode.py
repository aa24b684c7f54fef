"""Decode benchmark: DReSD against prompt lookup, REST and autoregressive decoding.

Protocol: one run, one machine, one model, the same HumanEval prompts, the same stores and the
same token budget for every method; ratios to autoregressive decoding on the same prompts are
reported, not absolute times, and a difference smaller than the run-to-run spread is a tie. Each
prompt is decoded by every method in turn (prompt-major order), so drift in the machine's speed
hits all methods alike. Per method and budget: AL, AR, TPS, speedup, and whether every output
equals autoregressive decoding's. The prompts that served development are named with the
results (benchmarks/RESULTS.md).

Methods:
- ``ar``: ``model.generate(do_sample=False)``, the reference every output is compared to;
- ``hf_prompt_lookup``: ``model.generate(prompt_lookup_num_tokens=10)``, off the shelf;
- our decoder with a drafter, at each draft budget: ``prompt_lookup``; ``rest`` (REST's search,
  longest context suffix in a suffix array over the store's corpus, then a trie of its
  continuations; dresd.drafters.rest); ``draftretriever`` (the PyPI package, which in its only
  release 0.1.1 is ADED's trigram retriever rather than REST's suffix array, so it runs as a
  baseline of its own); ``dense`` (the store); ``context`` (dense over the live context);
  ``suffix`` (SuffixDecoding: Arctic Inference's suffix trees over the store's documents and
  over the prompt and output, its own frequency-scored tree cut to the budget's node limit;
  dresd.drafters.suffix); ``rest+pl``; ``hybrid`` (dense store + context + prompt lookup in one
  tree, the default); ``hybrid+rest`` and ``hybrid+suffix`` (the same plus REST or
  SuffixDecoding); composites also under the device-calibrated budget;
- ``oracle``: drafts that are the model's own greedy continuation, the ceiling at a budget;
- ``selection_oracle``: the default's candidates with the right one chosen knowing the answer
  (benchmarks.oracle.SelectionOracle), the best any budget could do with the default's sources.
- ``hybrid_hand``: the default with its node model switched off (``CompositeDrafter(node_model=
  False)``: hand-built estimates only), to measure what the model adds in the same run.

Two stores: OOD (standard-library sources) and ID (the model's completions of HumanEval's
held-out problems and of standard-library signature prompts; benchmarks/corpora.py). Each prompt
is decoded ``--repeats`` times by every method, in whole rounds, and the fastest time is kept
(outputs are deterministic; only the clock varies). Results go to JSON, a PNG of two plots and
a .txt of the tables (also printed last).

Warm-up (``--warmup``): a server or notebook has usually answered other requests before, and the
composite carries its estimates (and the budget its measured verify costs) from one call to the
next. So by default each drafting method first decodes a short unrelated request
(``WARMUP_REQUEST``) before it is timed; ``--warmup both`` also runs every composite "cold", with
estimates of its own that no warm-up touched (label ``.../cold``), to show whether the warm-up
changed anything; ``--warmup off`` skips it. While the run goes they are kept up to date after
every prompt under ``<name>.partial.*``, so a run stopped early keeps the prompts it finished
and never overwrites the results of a finished one.

    python benchmarks/decode.py                      # the full run (make bench)
    python benchmarks/decode.py --prompts 2 --max-new-tokens 32 --stores ood --methods ar,dense
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpora import RUNS, id_store, ood_store, requests_store  # noqa: E402
from benchmarks.oracle import OracleDrafter, SelectionOracle  # noqa: E402
from benchmarks.prompts import EVAL_PROMPTS, FAMILIES  # noqa: E402
from dresd.decode import DecodeConfig, as_drafter, encode_prompt, generate  # noqa: E402
from dresd.drafters.registry import DRAFTERS as REGISTERED  # noqa: E402
from dresd.drafters.registry import hybrid_names  # noqa: E402
from dresd.models import dtype_name, load_model  # noqa: E402
from dresd.store import load_store  # noqa: E402
from schemas.atomic import replacing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Fixed budgets: drafts x tokens per draft, and the tree size cap (root included).
BUDGETS = {
    "1x7": dict(num_drafts=1, draft_len=7, max_tree_tokens=8),
    "4x8": dict(num_drafts=4, draft_len=8, max_tree_tokens=16),
    "10x10": dict(num_drafts=10, draft_len=10, max_tree_tokens=32),
}
CALIBRATED = "calibrated"
ID_PROMPTS = 552  # stdlib signature prompts of the ID store: every one Python 3.11 yields
HOWTO_PROMPTS = 256  # store-side requests a requests family's (howto, errors) ID store answers
COLD = "cold"  # a run whose composite keeps estimates of its own, untouched by the warm-up
WARMUP_REQUEST = [{"role": "user", "content": "Say hi in one short sentence."}]
WARMUP_TOKENS = 16

ALL = list(BUDGETS)
_HYBRID = ",".join(hybrid_names(has_store=True))
# DecodeConfig.drafter of each method that runs through dresd.generate's own source selection:
# every registered source alone, and the composites compared here
DRAFTERS = {**{name: name for name in REGISTERED},
            "rest+pl": "rest,prompt_lookup", "hybrid": _HYBRID, "hybrid+rest": _HYBRID + ",rest",
            "hybrid+suffix": _HYBRID + ",suffix"}
# method -> (needs a store, budgets it runs at)
METHODS = {
    "ar": (False, [""]),
    "hf_prompt_lookup": (False, [""]),
    "oracle": (False, ALL),
    "selection_oracle": (True, [CALIBRATED]),
    **{name: (spec.needs_store, ALL) for name, spec in REGISTERED.items()},
    "draftretriever": (True, ["4x8"]),
    "rest+pl": (True, ALL + [CALIBRATED]),
    "hybrid": (True, ["4x8", "10x10", CALIBRATED]),
    "hybrid+rest": (True, [CALIBRATED]),
    "hybrid+suffix": (True, [CALIBRATED]),
    "hybrid_hand": (True, [CALIBRATED]),  # the default with hand-built estimates only
}
METHODS["prompt_lookup"] = (False, ALL + [CALIBRATED])  # against the composites' calibrated


@dataclass(frozen=True)
class Run:
    method: str
    store: str  # "ood", "id" or "" when the method reads no store
    budget: str  # a key of BUDGETS, "calibrated", or "" (plain generate); "<budget>/cold"

    @property
    def label(self) -> str:
        return "/".join(x for x in (self.method, self.store, self.budget) if x)

    @property
    def cold(self) -> bool:
        return self.budget.endswith("/" + COLD)

    @property
    def drafts(self) -> bool:
        return self.method not in ("ar", "hf_prompt_lookup")


def plan(methods: list[str], stores: list[str], budgets: list[str] | None = None,
         cold: bool = False) -> list[Run]:
    """The runs: each method at each of its budgets (only those in ``budgets`` when given),
    per store; with ``cold``, each composite (calibrated) run also without the warm-up."""
    runs = []
    for m in methods:
        needs_store, kept = METHODS[m]
        kept = [b for b in kept if not budgets or not b or b in budgets]
        for s in stores if needs_store else [""]:
            runs += [Run(m, s, b) for b in kept]
            if cold:
                runs += [Run(m, s, f"{b}/{COLD}") for b in kept if b == CALIBRATED]
    return runs


def hf_generate(model, ids: list[int], max_new_tokens: int, **kw) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=max_new_tokens, **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(ids):].tolist(), time.perf_counter() - t


# each run's composite estimates, carried from one prompt to the next (and from the warm-up) as a
# server's would be from one request to the next; a cold run is a run of its own, so its
# estimates are its own too
_ESTIMATES_PER_RUN: dict[Run, dict] = {}


def run_one(run: Run, model, tokenizer, stores: dict, ids: list[int], reference: list[int],
            max_new_tokens: int) -> dict:
    """Decode one prompt with one method; a JSON-ready record."""
    if run.method in ("ar", "hf_prompt_lookup"):
        kw = {"prompt_lookup_num_tokens": 10} if run.method == "hf_prompt_lookup" else {}
        tokens, seconds = hf_generate(model, ids, max_new_tokens, **kw)
        return dict(tokens=len(tokens), seconds=seconds, identical=tokens == reference,
                    accepted_lengths=[])
    budget = BUDGETS.get(run.budget.split("/")[0], {})
    store = stores.get(run.store)
    if run.method == "oracle":
        vocab = model.get_output_embeddings().weight.shape[0]
        source = OracleDrafter(len(ids), reference, vocab)
        config = DecodeConfig(max_new_tokens=max_new_tokens, **budget)
    elif run.method == "draftretriever":  # the PyPI package, not one of dresd's own sources
        from benchmarks.draftretriever import DraftRetrieverDrafter

        source = DraftRetrieverDrafter.from_store(store)
        config = DecodeConfig(max_new_tokens=max_new_tokens, **budget)
    else:
        policy = "calibrated" if run.budget.startswith(CALIBRATED) else "fixed"
        choose = run.method == "selection_oracle"  # the default's candidates, chosen by it
        hand = run.method == "hybrid_hand"  # the default without its node model
        config = DecodeConfig(max_new_tokens=max_new_tokens, budget=policy, **budget,
                              drafter=DRAFTERS["hybrid" if choose or hand else run.method])
        memory = _ESTIMATES_PER_RUN.setdefault(run, {})
        if choose or hand:  # the default's sources and budget, in a composite of this run's
            from dresd.drafters.composite import CompositeDrafter

            default = as_drafter(store, config, model, tokenizer)
            source = CompositeDrafter(default.drafters, default.policy, memory=memory,
                                      node_model=not hand)
        else:  # (store is None for the store-free sources)
            source = as_drafter(store, config, model, tokenizer, memory=memory)
        if choose:
            source = SelectionOracle(source, len(ids), reference)
    lengths: list[int] = []
    result = generate(model, tokenizer, source, ids, config,
                      on_token=lambda new, text: lengths.append(len(new)))
    st = result.stats
    return dict(tokens=st.new_tokens, seconds=st.total_s, identical=result.tokens == reference,
                steps=st.steps, step_tokens=st.step_tokens, accepted=st.accepted_tokens,
                proposed=st.proposed_tokens, tree_tokens=st.tree_tokens,
                # kept as "retrieval_s", the key every result file uses; it is drafting_s
                retrieval_s=st.drafting_s, verify_s=st.verify_s, prefill_s=st.prefill_s,
                accepted_lengths=lengths[1:])  # the first call is the prefill's token


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, store, budget): AL, AR, TPS, speedup over ar on the same prompts."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["store"], r["budget"])].append(r)
    ar = groups[("ar", "", "")]
    ar_tps = sum(r["tokens"] for r in ar) / sum(r["seconds"] for r in ar)
    rows = []
    for (method, store, budget), rs in groups.items():
        tokens = sum(r["tokens"] for r in rs)
        seconds = sum(r["seconds"] for r in rs)
        steps = sum(r.get("steps", 0) for r in rs)
        proposed = sum(r.get("proposed", 0) for r in rs)
        tps = tokens / seconds
        rows.append(dict(
            method=method, store=store, budget=budget, prompts=len(rs), tokens=tokens,
            AL=sum(r.get("step_tokens", 0) for r in rs) / steps if steps else 1.0,
            AR=sum(r.get("accepted", 0) for r in rs) / proposed if proposed else 0.0,
            TPS=tps, speedup=tps / ar_tps,
            retrieval_share=sum(r.get("retrieval_s", 0.0) for r in rs) / seconds,
            verify_share=sum(r.get("verify_s", 0.0) for r in rs) / seconds,
            mean_tree=sum(r.get("tree_tokens", 0) for r in rs) / steps if steps else 1.0,
            identical=all(r["identical"] for r in rs),
        ))
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Each method's best budget per store (store-free methods appear once)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["method"], r["store"])
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["store"], -r["speedup"]))


def format_table(rows: list[dict]) -> str:
    w = max([6] + [len(r["store"]) + 2 for r in rows])  # 'id-ivf_flat' and the like
    head = (f"{'method':<17}{'store':<{w}}{'budget':<16}{'AL':>6}{'AR':>6}{'TPS':>7}"
            f"{'speedup':>9}{'retr%':>7}{'verify%':>9}{'tree':>6}  identical")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<17}{r['store'] or '-':<{w}}{r['budget'] or '-':<16}{r['AL']:>6.2f}"
            f"{r['AR']:>6.2f}{r['TPS']:>7.1f}{r['speedup']:>8.2f}x{100 * r['retrieval_share']:>6.1f}"
            f"{100 * r['verify_share']:>8.1f}{r['mean_tree']:>7.1f}  "
            f"{'yes' if r['identical'] else 'NO'}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = sorted({r["store"] for r in rows if r["store"]}) or [""]
    fig, axes = plt.subplots(1, len(stores) + 1, figsize=(6 * (len(stores) + 1), 4.5))
    order = list(BUDGETS) + [CALIBRATED]
    for ax, store in zip(axes, stores):
        for method in METHODS:
            pts = [r for r in rows if r["method"] == method and r["budget"] in order
                   and r["store"] in (store, "")]
            if pts:
                pts.sort(key=lambda r: order.index(r["budget"]))
                ax.plot([order.index(r["budget"]) for r in pts], [r["speedup"] for r in pts],
                        "o-", label=method)
        for r in (r for r in rows if r["method"] == "hf_prompt_lookup"):
            ax.axhline(r["speedup"], ls=":", lw=1, color="gray",
                       label="transformers prompt_lookup_num_tokens=10")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xticks(range(len(order)), order)
        ax.set_title(f"store: {store.upper() or '-'}")
        ax.set_xlabel("draft budget (drafts x tokens, or calibrated to the device)")
        ax.set_ylabel("speedup over autoregressive")
        ax.legend(fontsize=7)
    ax = axes[-1]
    hist_store = "id" if "id" in stores else stores[-1]  # the in-domain store when there is one
    best = {(r["method"], r["store"]): r["budget"] for r in best_rows(rows)}
    for (method, store), budget in sorted(best.items()):
        if store not in ("", hist_store) or method in ("ar", "hf_prompt_lookup",
                                                       "draftretriever", "hybrid+rest",
                                                       "hybrid+suffix"):
            continue
        lens = [n for rec in records if (rec["method"], rec["store"], rec["budget"])
                == (method, store, budget) for n in rec["accepted_lengths"]]
        if lens:
            ax.hist(lens, bins=range(1, max(lens) + 2), histtype="step", density=True,
                    label=f"{method} {budget}")
    ax.set_title(f"tokens per verify step (best budget, store {hist_store.upper() or '-'})")
    ax.set_xlabel("accepted draft tokens + 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)  # drawn after every prompt: pyplot keeps open figures alive


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="", help="'' picks CUDA when present")
    ap.add_argument("--dtype", default="", help="'' is float32 (see dresd.models.pick_dtype)")
    ap.add_argument("--prompts", type=int, default=8,
                    help=f"HumanEval prompts (the first n, at most {EVAL_PROMPTS})")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2,
                    help="decode each prompt this many times per method and keep the fastest: "
                         "on a shared machine one timing can be 10-15%% off")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="",
                    help="keep only these budgets (comma-separated: " + ", ".join(BUDGETS)
                         + f", {CALIBRATED}); default all")
    ap.add_argument("--warmup", choices=("on", "off", "both"), default="on",
                    help="decode a short unrelated request with each method before timing it "
                         "(both: also run each composite cold, to compare)")
    ap.add_argument("--stores", default="ood,id")
    ap.add_argument("--ood-tokens", type=int, default=130_000, help="size of the OOD corpus")
    ap.add_argument("--family", choices=tuple(FAMILIES), default="humaneval",
                    help="prompt family: HumanEval function stubs, howto requests about the "
                         "standard library, or users' requests about a library's errors "
                         "(benchmarks/prompts.py); each has its own ID store")
    ap.add_argument("--howto-prompts", type=int, default=HOWTO_PROMPTS,
                    help="store-side requests the ID store of a requests family (howto, "
                         "errors) answers")
    ap.add_argument("--id-prompts", type=int, default=ID_PROMPTS,
                    help="stdlib signature prompts the ID corpus is generated from, besides "
                         "HumanEval's held-out problems (552: every one Python 3.11's standard "
                         "library yields)")
    ap.add_argument("--index-kinds", default="",
                    help="also build each store with these index kinds and decode with them "
                         "(e.g. ivf_flat: uncompressed float keys, against the default PQ "
                         "codes); such a store is named <store>-<kind>")
    ap.add_argument("--out", default="", help="JSON results (default benchmarks/results/"
                                              "decode-<device>[-<dtype>].json; .png and .txt "
                                              "next to it)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    # a bad --prompts fails before any loading
    family = FAMILIES[args.family]
    prompts = family.eval_prompts(args.prompts)
    messages = family.messages

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, device=args.device or None,
                                  dtype=args.dtype or None)
    device = model.device.type
    stores_wanted = [s for s in args.stores.split(",") if s]
    paths = {}
    variants = [{}] + [{"index_kind": k} for k in args.index_kinds.split(",") if k]
    for build in variants:
        tag = "".join(f"-{v}" for v in build.values())
        if "ood" in stores_wanted:
            paths["ood" + tag] = ood_store(args.model, args.ood_tokens, **build)
        if "id" in stores_wanted:
            paths["id" + tag] = (requests_store(args.model, family.name, args.howto_prompts,
                                                **build) if family.store_prompts
                                 else id_store(args.model, args.id_prompts, **build))
    stores = {name: load_store(p, model, tokenizer) for name, p in paths.items()}
    for name, store in stores.items():
        print(f"store {name}: {store.stats.summary()}", file=sys.stderr)
    methods = [m for m in args.methods.split(",") if m]
    if "ar" not in methods:
        methods.insert(0, "ar")
    runs = plan(methods, list(stores), [b for b in args.budgets.split(",") if b],
                cold=args.warmup == "both")
    cal = None
    if any(r.budget == CALIBRATED for r in runs):
        from dresd.budget import calibrated_budget

        cal = calibrated_budget(model, tokenizer).calibration
        print("verify cost relative to one token: " + ", ".join(
            f"{n}: {cal.relative_cost(n):.2f}" for n in cal.sizes), file=sys.stderr)

    # warm-up: first calls pay for lazy initialisation that later ones do not
    warm = encode_prompt(tokenizer, messages(prompts[0]))
    hf_generate(model, warm, 8)
    generate(model, tokenizer, stores[next(iter(stores))] if stores else
             OracleDrafter(len(warm), [], 1), warm, DecodeConfig(max_new_tokens=8))

    if args.warmup != "off":  # as a long-running process would have been
        short = encode_prompt(tokenizer, WARMUP_REQUEST)
        for run in runs:
            if run.drafts and not run.cold:
                run_one(run, model, tokenizer, stores, short, [], WARMUP_TOKENS)

    records: list[dict] = []
    from tqdm import tqdm

    dtype = dtype_name(model.dtype)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    out = Path(args.out) if args.out else RESULTS / f"decode-{device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.json")
    meta = dict(machine=machine(), device=device, dtype=dtype,
                torch_threads=torch.get_num_threads(), model=args.model,
                family=args.family, prompts=0, prompts_planned=len(prompts),
                max_new_tokens=args.max_new_tokens,
                repeats=args.repeats, warmup=args.warmup,
                warmup_request=WARMUP_REQUEST if args.warmup != "off" else None,
                budgets=BUDGETS, stores={k: str(v.relative_to(RUNS.parent)) if v.is_relative_to(
                    RUNS.parent) else str(v) for k, v in paths.items()},
                store_stats={k: asdict(s.stats) for k, s in stores.items()},
                calibration=asdict(cal) if cal else None,
                started=time.strftime("%Y-%m-%d %H:%M"))
    bar = tqdm(total=len(prompts) * len(runs) * args.repeats, desc="decoding", unit="run")
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, messages(prompt))
        reference, _ = hf_generate(model, ids, args.max_new_tokens)
        tries: dict[Run, list[dict]] = defaultdict(list)
        for _ in range(args.repeats):  # whole rounds, so a slow spell hits every method alike
            for run in runs:
                tries[run].append(run_one(run, model, tokenizer, stores, ids, reference,
                                          args.max_new_tokens))
                bar.set_postfix_str(run.label)
                bar.update()
        for run, recs in tries.items():
            fastest = min(recs, key=lambda r: r["seconds"])
            records.append({**asdict(run), "prompt": i, **fastest,
                            "identical": all(r["identical"] for r in recs),
                            "all_seconds": [r["seconds"] for r in recs]})
        meta["prompts"] = i + 1
        write_results(partial, meta, records)  # a run stopped early keeps what it finished
    bar.close()
    rows = write_results(out, {**meta, "finished": time.strftime("%Y-%m-%d %H:%M")}, records)
    for suffix in (".json", ".png", ".txt"):
        partial.with_suffix(suffix).unlink(missing_ok=True)
    print(f"\nresults: {out}, {out.with_suffix('.png')} and {out.with_suffix('.txt')}\n")
    print(out.with_suffix(".txt").read_text())
    return 0 if all(r["identical"] for r in rows) else 1


def write_results(out: Path, meta: dict, records: list[dict]) -> list[dict]:
    """The JSON, the plot and the tables (.txt) of the records so far; the summary rows. Each
    file is replaced atomically, so one stopped mid-write is never left truncated."""
    rows = summarize(records)
    with replacing(out) as tmp:
        tmp.write_text(json.dumps(dict(meta=meta, rows=rows, records=records), indent=1))
    with replacing(out.with_suffix(".png")) as tmp:
        plot(rows, records, tmp)
    with replacing(out.with_suffix(".txt")) as tmp:
        tmp.write_text(
            f"machine: {meta['machine']} ({meta['dtype']}); {meta['prompts']} {FAMILIES[meta.get('family', 'humaneval')].title} "
            f"prompts, {meta['max_new_tokens']} new tokens, fastest of {meta['repeats']}; "
            "speedup = TPS / TPS of ar on the same prompts\n\nall runs:\n"
            + format_table(sorted(rows, key=lambda r: (r["store"], r["method"], r["budget"])))
            + "\n\nbest budget per method:\n" + format_table(best_rows(rows)) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(main())
