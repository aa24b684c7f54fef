"""Device check: greedy speculative decoding equals ``model.generate`` token for token.

For the tiny random Llama, Qwen2 and GPT-2 models of the test suite (no files needed, so the
check travels light to a GPU machine) on a few prompts of real Python source, and for the real
default model (``--models ...,default``) on standard-library signature prompts in HumanEval's
chat format, every store-free source of dresd.drafters.registry (each alone and all merged) under the fixed
and the calibrated budget decodes each prompt; each output is compared with plain greedy
``model.generate`` on the same device, in float32. It also records what the calibrated budget's cost curve learned while decoding: the
saved calibration against the verify passes the decoder measured (``dresd.budget.VerifyCost``).

    python benchmarks/cuda_lossless.py --device cuda --models llama,qwen2,gpt2,default
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the suite's tiny models, built in-process

from tiny_models import make_tiny_model, stdlib_files  # noqa: E402

from benchmarks.prompts import chat, stdlib_signature_prompts  # noqa: E402
from dresd.budget import calibrated_budget  # noqa: E402
from dresd.decode import encode_prompt, generate  # noqa: E402
from dresd.drafters.registry import DRAFTERS as REGISTERED  # noqa: E402
from dresd.models import load_model  # noqa: E402

FAMILIES = ("llama", "qwen2", "gpt2")
_STORE_FREE = [s.name for s in REGISTERED.values() if not s.needs_store]
DRAFTERS = (*_STORE_FREE, ",".join(_STORE_FREE))  # each store-free source, and all merged
BUDGETS = ("fixed", "calibrated")


def model_and_prompts(name: str, device: str, n: int, length: int):
    if name == "default":
        model, tok = load_model("default", device=device)
        return model, tok, [encode_prompt(tok, chat(p)) for p in stdlib_signature_prompts(n)]
    model, tok = make_tiny_model(name)
    return model.to(device), tok, source_prompts(tok, n, length)


def source_prompts(tok, n: int, length: int) -> list[list[int]]:
    out = []
    for path in stdlib_files(n):
        ids = tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        out.append(ids[:length])
    return out


def reference(model, ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=max_new_tokens)
    return out[0, len(ids):].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=",".join(FAMILIES),
                    help="tiny families and/or 'default' (the real default model)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    rows, learned = [], {}
    t0 = time.perf_counter()
    families = [m for m in args.models.split(",") if m]
    for family in families:
        model, tok, prompt_ids = model_and_prompts(family, args.device, args.prompts,
                                                   args.prompt_tokens)
        for i, ids in enumerate(prompt_ids):
            ref = reference(model, ids, args.max_new_tokens)
            for drafter in DRAFTERS:
                for budget in BUDGETS:
                    res = generate(model, tok, None, ids, max_new_tokens=args.max_new_tokens,
                                   drafter=drafter, budget=budget)
                    st = res.stats
                    rows.append(dict(family=family, prompt=i, drafter=drafter, budget=budget,
                                     identical=res.tokens == ref, tokens=st.new_tokens,
                                     AL=st.accepted_length, steps=st.steps))
        policy = calibrated_budget(model, tok)
        learned[family] = {
            "saved_ms": {n: 1e3 * policy.calibration.cost(n) for n in (1, 2, 4, 8, 16, 32)},
            "measured_ms": {n: 1e3 * s for n, s in policy.costs.measured.items()},
            "calibration_rounds": policy.calibration.describe_rounds(),
        }
    bad = [r for r in rows if not r["identical"]]
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else ''})"
          f", float32: {len(rows) - len(bad)} of {len(rows)} outputs identical to "
          f"model.generate, {time.perf_counter() - t0:.0f} s", flush=True)
    for family in families:
        for drafter in DRAFTERS:
            for budget in BUDGETS:
                rs = [r for r in rows if (r["family"], r["drafter"], r["budget"])
                      == (family, drafter, budget)]
                al = sum(r["tokens"] for r in rs) / max(1, sum(r["steps"] for r in rs))
                print(f"  {family:<6} {drafter:<22} {budget:<11} identical "
                      f"{sum(r['identical'] for r in rs)}/{len(rs)}  tokens/step {al:.2f}")
        cost = learned[family]
        print(f"  {family} verify cost, saved vs measured while decoding (ms): "
              + ", ".join(f"{n}: {cost['saved_ms'][n]:.2f}/{cost['measured_ms'].get(n, float('nan')):.2f}"
                          for n in (1, 2, 4, 8, 16)) + f"; calibration {cost['calibration_rounds']}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=args.device, rows=rows,
                                                  learned=learned), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
