"""The acceptance replay drives a drafter through the same steps as the decoder."""

import pytest
import torch
from tiny_models import greedy_reference, make_tiny_model

from benchmarks import replay
from benchmarks.oracle import OracleDrafter, SelectionOracle
from dresd.budget import CalibratedBudget, FixedBudget
from dresd.calibrate import Calibration
from dresd.decode import DecodeConfig, generate
from dresd.drafters.base import DraftRequest
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


def test_selection_oracle_verifies_only_the_right_candidate_path():
    """Every node it verifies is accepted, it accepts at least as much as the composite whose
    candidates it chooses from, and the output stays the model's own."""
    model, tok = make_tiny_model("llama")
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, CONFIG.max_new_tokens)

    def composite():
        return CompositeDrafter([PromptLookupDrafter()], FixedBudget(16))

    chosen = generate(model, tok, SelectionOracle(composite(), len(ids), ref), ids, CONFIG)
    assert chosen.tokens == ref
    st = chosen.stats
    assert st.accepted_tokens > 0
    assert st.tree_tokens == st.steps + st.accepted_tokens  # root + accepted path, no waste
    plain = generate(model, tok, composite(), ids, CONFIG)
    assert plain.tokens == ref
    assert plain.stats.tree_tokens > plain.stats.steps + plain.stats.accepted_tokens  # it wastes
    assert st.accepted_length >= plain.stats.accepted_length


def test_replay_with_the_right_candidate_chosen():
    """Replayed through a SelectionOracle, a composite's steps accept every verified node and
    exactly what its candidates offered, and the summary keeps the composite's figures."""
    model, tok = make_tiny_model("llama")
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, CONFIG.max_new_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = replay.final_states(model, ids + ref)
    composite = CompositeDrafter([PromptLookupDrafter()], FixedBudget(16))
    records = replay.replay(SelectionOracle(composite, len(ids), ref), ids, ref, hidden, CONFIG,
                            vocab, cost=lambda n: 0.01 * n)
    assert sum(r.accepted for r in records) > 0
    assert all(r.tree == r.accepted == r.offered for r in records)
    assert all(r.expected >= 0 for r in records)
    assert "offered_per_step" in replay.summarize(records, len(ref) - 1, 0.01)


# A CPU-like curve: a bigger tree costs more, never less
CPU_CURVE = Calibration("fp", "cpu-test", 300, (1, 4, 16, 32, 64),
                        (0.062, 0.104, 0.134, 0.159, 0.229))


def test_a_fixed_drafting_time_makes_calibrated_replays_repeatable():
    """The calibrated budget weighs the drafting time against the verify cost: fixed, the same
    replay chooses the same trees; a larger one buys bigger trees (a node costs relatively
    less); and a negative one is refused."""
    model, tok = make_tiny_model("llama")
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, CONFIG.max_new_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = replay.final_states(model, ids + ref)
    config = DecodeConfig(max_new_tokens=48, budget="calibrated", num_drafts=4, draft_len=6)

    def trees(drafting_s):
        drafter = CompositeDrafter([PromptLookupDrafter()], CalibratedBudget(CPU_CURVE, 16),
                                   drafting_s=drafting_s)
        records = replay.replay(drafter, ids, ref, hidden, config, vocab, CPU_CURVE.cost)
        return [r.tree for r in records]

    quick, slow = trees(0.0), trees(1.0)
    assert sum(slow) > sum(quick)
    assert slow == trees(1.0)

    def first_tree(drafting_s):  # the fixed time counts from the very first step
        drafter = CompositeDrafter([PromptLookupDrafter()], CalibratedBudget(CPU_CURVE, 16),
                                   drafting_s=drafting_s)
        prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
        drafter.begin(prompt, torch.zeros(len(prompt), 8))
        request = DraftRequest(prompt + [3], torch.zeros(8), num_drafts=4, draft_len=6)
        return len(drafter.propose_tree(request, config.tree_budget, vocab))

    assert first_tree(1.0) > first_tree(0.0) > 1
    for bad in (-0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="drafting_s"):
            CompositeDrafter([PromptLookupDrafter()], drafting_s=bad)


def test_prompt_ranges():
    assert replay.parse_prompts("8-11") == [8, 9, 10, 11]
    assert replay.parse_prompts("3") == [0, 1, 2]
    assert replay.parse_prompts("0,5") == [0, 5]
