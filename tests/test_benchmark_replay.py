"""The acceptance replay drives a drafter through the same steps as the decoder."""

import pytest
from tiny_models import greedy_reference, make_tiny_model

from benchmarks import replay
from benchmarks.oracle import OracleDrafter
from dresd.budget import FixedBudget
from dresd.decode import DecodeConfig, generate
from dresd.drafters.composite import CompositeDrafter
from dresd.drafters.prompt_lookup import PromptLookupDrafter

PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef "
CONFIG = DecodeConfig(max_new_tokens=48, budget="fixed", num_drafts=4, draft_len=6,
                      max_tree_tokens=16)


@pytest.mark.parametrize("make", [
    lambda: PromptLookupDrafter(),
    lambda: CompositeDrafter([PromptLookupDrafter()], FixedBudget(16)),
], ids=["prompt_lookup", "composite"])
def test_replay_accepts_what_decoding_accepts(make):
    model, tok = make_tiny_model("llama")
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, CONFIG.max_new_tokens)
    emitted: list[int] = []
    result = generate(model, tok, make(), ids, CONFIG,
                      on_token=lambda new, text: emitted.append(len(new)))
    assert result.tokens == ref
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = replay.final_states(model, ids + ref)
    assert hidden.shape[0] == len(ids + ref)
    records = replay.replay(make(), ids, ref, hidden, CONFIG, vocab, cost=lambda n: 0.01 * n)
    assert [r.accepted + 1 for r in records] == emitted[1:]  # the first is the prefill's
    assert sum(r.accepted for r in records) > 0  # the prompt repeats itself: drafts land
    assert all(r.cost_s == pytest.approx(0.01 * (r.tree + 1)) for r in records)
    if isinstance(make(), CompositeDrafter):  # its candidates hold at least what it verified
        assert all(r.offered >= r.accepted and r.expected >= 0 for r in records)
    else:
        assert all(r.offered == -1 and r.expected == -1 for r in records)


def test_oracle_replay_accepts_every_reachable_token():
    model, tok = make_tiny_model("llama")
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, CONFIG.max_new_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = replay.final_states(model, ids + ref)
    records = replay.replay(OracleDrafter(len(ids), ref, vocab), ids, ref, hidden, CONFIG,
                            vocab, cost=lambda n: 1.0)
    assert all(r.accepted == r.reachable for r in records)
    assert sum(r.accepted + 1 for r in records) == len(ref) - 1
    summary = replay.summarize(records, ar_passes=len(ref) - 1, ar_cost=1.0)
    assert summary["AL"] == pytest.approx((len(ref) - 1) / len(records))
    assert summary["modelled_speedup"] > 1  # fewer passes than tokens, at one pass's cost


def test_prompt_ranges():
    assert replay.parse_prompts("8-11") == [8, 9, 10, 11]
    assert replay.parse_prompts("3") == [0, 1, 2]
    assert replay.parse_prompts("0,5") == [0, 5]
