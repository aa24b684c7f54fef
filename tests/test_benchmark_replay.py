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


def test_per_prompt_speedups_make_up_the_total():
    """replay_method records each prompt's modelled speedup (for paired comparisons); with
    a_i one-token passes' cost and c_i the method's cost on prompt i, the total speedup
    sum(a_i) / sum(c_i) is the a-weighted harmonic mean of the per-prompt a_i / c_i."""
    model, tok = make_tiny_model("llama")
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [tok(PROMPT)["input_ids"], tok("def sub(a, b):\n    return a - b\n\ndef sub")
               ["input_ids"]]

    def prepare(ids):
        ref = greedy_reference(model, ids, CONFIG.max_new_tokens)
        return ids, ref, replay.final_states(model, ids + ref)

    summary = replay.replay_method(PromptLookupDrafter(), prompts, prepare, CONFIG, vocab,
                                   CPU_CURVE)
    per = summary["per_prompt_speedup"]
    assert len(per) == 2 and all(s > 0 for s in per)
    passes = [len(prepare(p)[1]) - 1 for p in prompts]
    total = sum(passes) / sum(n / s for n, s in zip(passes, per))
    assert total == pytest.approx(summary["modelled_speedup"], rel=1e-9)


def test_regime_rows_take_each_methods_best_budget_and_pair_by_prompt():
    import math

    from benchmarks import regimes

    def run(speedups):
        return {"modelled_speedup": float(sum(speedups) / len(speedups)), "AL": 2.0,
                "per_prompt_speedup": speedups}

    results = {"hybrid/id/calibrated": run([2.2, 2.4, 2.0]), "hybrid/id/4x8": run([1.0] * 3),
               "rest+pl/id/1x7": run([1.9, 2.0, 1.8]), "rest+pl/id/calibrated": run([2.0, 2.1, 1.9]),
               "suffix/id/4x8": run([1.5, 1.5, 1.5])}
    row = regimes.regime_row("errors", "curve", results)
    assert row["hybrid"]["budget"] == "calibrated" and row["rest+pl"]["budget"] == "calibrated"
    assert row["best_rival"] == "rest+pl"
    logs = [math.log(a / b) for a, b in zip([2.2, 2.4, 2.0], [2.0, 2.1, 1.9])]
    mean = sum(logs) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2 / 3)
    assert row["lead"] == pytest.approx(mean) and row["lead_se"] == pytest.approx(se)
    assert row["target_met"] is (mean >= math.log(1.1))
    assert "rest+pl (" in regimes.table([row])
    with pytest.raises(KeyError, match="suffix"):
        regimes.best({"hybrid/id/4x8": run([1.0, 1.0])}, "suffix")
