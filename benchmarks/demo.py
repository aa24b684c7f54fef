"""The demo (``make demo``): build a small store, decode HumanEval prompts with it, compare.

On embedded defaults and no arguments: the default model (SmolLM2-135M-Instruct, converted
once from its PyPI wheel), a store over ~30k tokens of the Python standard library built by the
Beam pipelines, then a few HumanEval prompts decoded with plain greedy ``model.generate`` and
with ``dresd.generate`` (its default drafter and budget), checked token for token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpora import ood_store  # noqa: E402
from benchmarks.decode import hf_generate  # noqa: E402
from benchmarks.prompts import chat, humaneval_prompts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--corpus-tokens", type=int, default=30_000)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import dresd
    from dresd.decode import encode_prompt
    from dresd.models import load_model

    print("[1/3] model", flush=True)
    model, tokenizer = load_model(args.model)
    print(f"      {args.model}: {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {model.device}")

    print(f"[2/3] store over ~{args.corpus_tokens // 1000}k tokens of the standard library "
          "(Beam DirectRunner)", flush=True)
    path = ood_store(args.model, args.corpus_tokens, sample_size=4096)
    store = dresd.load_store(path, model, tokenizer)
    print(f"      {path}: {store.stats.summary()}")

    print(f"[3/3] {args.prompts} HumanEval prompts, {args.max_new_tokens} new tokens: plain "
          "greedy vs dresd.generate", flush=True)
    prompts = humaneval_prompts(args.prompts)
    # Warm-up outside the timings: first calls pay one-time costs (lazy initialisation, and on
    # a new machine the measurement of its verify cost behind the calibrated budget).
    warm = encode_prompt(tokenizer, chat(prompts[0]))
    hf_generate(model, warm, 4)
    # One drafter for every request: it carries its acceptance estimates from one to the next.
    drafter = dresd.as_drafter(store, dresd.DecodeConfig(), model, tokenizer)
    dresd.generate(model, tokenizer, drafter, warm, max_new_tokens=4)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, chat(prompt))
        plain, plain_s = hf_generate(model, ids, args.max_new_tokens)
        result = dresd.generate(model, tokenizer, drafter, ids,
                                max_new_tokens=args.max_new_tokens)
        st = result.stats
        rows.append((i, len(plain), plain_s, st.new_tokens, st.total_s, st.accepted_length,
                     result.tokens == plain))
        if i == 0:
            print("\n--- first completion (dresd) ---\n" + result.text.strip() + "\n---")
            print(f"      stats: {st.summary()}\n")

    print(f"{'prompt':>6}{'plain tok/s':>13}{'dresd tok/s':>13}{'AL':>6}{'speedup':>9}  identical")
    for i, n_plain, s_plain, n, s, al, same in rows:
        print(f"{i:>6}{n_plain / s_plain:>13.1f}{n / s:>13.1f}{al:>6.2f}"
              f"{(n / s) / (n_plain / s_plain):>8.2f}x  {'yes' if same else 'NO'}")
    plain_tps = sum(r[1] for r in rows) / sum(r[2] for r in rows)
    dresd_tps = sum(r[3] for r in rows) / sum(r[4] for r in rows)
    print(f"{'all':>6}{plain_tps:>13.1f}{dresd_tps:>13.1f}{'':>6}{dresd_tps / plain_tps:>8.2f}x  "
          f"{'yes' if all(r[6] for r in rows) else 'NO'}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; the full comparison with REST and "
          "prompt lookup is `make bench`.")
    return 0 if all(r[6] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
