"""The decode loop: lossless greedy decoding on three families, stops, callbacks, bad input."""

from collections.abc import Sequence

import pytest
from tiny_models import greedy_reference, make_tiny_model

from dresd.decode import DecodeConfig, generate
from dresd.drafters.base import Draft, Drafter, DraftRequest

PROMPT = "def parse_args(argv):\n    parser = "


class ReferenceDrafter(Drafter):
    """Drafts built from a known greedy output: right, partly wrong and wrong continuations.

    The best-scored draft turns wrong after ``good`` tokens and a lower-scored one stays right,
    so accepted paths leave the tree's first branch and pruning has to index-select.
    """

    name = "reference"

    def __init__(self, prompt_len: int, reference: Sequence[int], vocab_size: int, good: int = 2):
        self.prompt_len = prompt_len
        self.reference = list(reference)
        self.vocab = vocab_size
        self.good = good
        self.began = 0
        self.accepted: list[int] = []

    def begin(self, prompt_tokens, prompt_hidden):
        assert prompt_hidden.shape[0] == len(prompt_tokens) == self.prompt_len
        self.began += 1
        self.accepted = []

    def propose(self, request: DraftRequest) -> list[Draft]:
        i = len(request.tokens) - self.prompt_len
        truth = tuple(self.reference[i : i + request.draft_len])
        if not truth:
            return []

        def wrong(t):
            return (t + 1) % self.vocab

        partly = truth[: self.good] + tuple(wrong(t) for t in truth[self.good :])
        return [
            Draft(partly, 0.9, self.name),
            Draft((wrong(truth[0]),) + truth[1:], 0.8, self.name),
            Draft(truth, 0.5, self.name),
        ][: request.num_drafts]

    def accept(self, tokens, hidden):
        assert hidden.shape[0] == len(tokens)
        self.accepted.extend(tokens)


@pytest.mark.parametrize("good", [0, 2, 5])
def test_greedy_equals_model_generate(tiny_model, good):
    model, tok = tiny_model
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, 40)
    drafter = ReferenceDrafter(len(ids), ref, len(tok), good=good)
    res = generate(model, tok, drafter, PROMPT, max_new_tokens=40, draft_len=6)
    assert res.tokens == ref
    assert res.text == tok.decode(ref, skip_special_tokens=True)
    s = res.stats
    assert s.new_tokens == len(ref) and s.prompt_tokens == len(ids)
    # The always-right draft is accepted in full every step (up to the budget's end).
    assert s.accepted_length > 3
    assert s.accepted_tokens + s.steps >= len(ref) - 1
    assert 0 < s.acceptance_rate <= 1
    assert drafter.began == 1
    assert drafter.accepted == ref[: len(drafter.accepted)]


def test_no_drafts_is_plain_greedy(tiny_model):
    model, tok = tiny_model
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, 12)

    class Silent(Drafter):
        def propose(self, request):
            return []

    res = generate(model, tok, Silent(), ids, max_new_tokens=12)
    assert res.tokens == ref
    assert res.stats.steps == len(ref) - 1 and res.stats.accepted_length == 1
    assert res.stats.acceptance_rate == 0


def test_stops_on_eos_like_model_generate(tiny_llama_dir):
    from dresd.models import load_model

    model, tok = load_model(tiny_llama_dir)
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, 30)
    eos = ref[7]  # make a token the model emits early the stop token
    model.generation_config.eos_token_id = eos
    ref = greedy_reference(model, ids, 30)
    assert ref[-1] == eos and len(ref) <= 8
    res = generate(model, tok, ReferenceDrafter(len(ids), ref + [5] * 20, len(tok), good=10),
                   ids, max_new_tokens=30)
    assert res.tokens == ref
    assert res.stats.stopped_by == "eos"


def test_stop_strings_and_streaming(tiny_model):
    model, tok = tiny_model
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, 30)
    full = tok.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    pieces = []
    res = generate(model, tok, ReferenceDrafter(len(ids), ref, len(tok), good=3), ids,
                   max_new_tokens=30, stop_strings=(stop,),
                   on_token=lambda toks, text: pieces.append((toks, text)))
    assert res.stats.stopped_by == "stop_string"
    assert res.text == full[: full.find(stop)]
    assert stop in tok.decode(res.tokens) and stop not in tok.decode(res.tokens[:-1])
    assert res.tokens == ref[: len(res.tokens)]
    assert [t for toks, _ in pieces for t in toks] == res.tokens
    assert len(pieces) > 1


def test_chat_messages_use_the_chat_template(tiny_model):
    model, tok = tiny_model
    msgs = [{"role": "user", "content": "Write a function."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    ref = greedy_reference(model, ids, 10)
    res = generate(model, tok, ReferenceDrafter(len(ids), ref, len(tok)), msgs,
                   max_new_tokens=10)
    assert res.prompt_tokens == ids and res.tokens == ref


def test_bad_inputs(tiny_model):
    model, tok = tiny_model

    class Wild(Drafter):
        def propose(self, request):
            return [Draft((len(tok) + 5,), 1.0, "wild")]

    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, tok, Wild(), [1, 2, len(tok) + 3], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, tok, Wild(), PROMPT, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, Wild(), [], max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        DecodeConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0)
    with pytest.raises(TypeError, match="Drafter or a Store"):
        generate(model, tok, object(), PROMPT, max_new_tokens=4)


def test_stats_count_steps_and_accepted_tokens_exactly():
    # The truth branch sits below a better-scored partly-wrong draft, so every step accepts
    # exactly draft_len tokens off the first branch: 5 tokens per verify step.
    model, tok = make_tiny_model("llama")
    ids = tok(PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, 21)
    assert len(ref) == 21 and tok.eos_token_id not in ref
    drafter = ReferenceDrafter(len(ids), ref, len(tok), good=2)
    out = generate(model, tok, drafter, ids, max_new_tokens=21, num_drafts=3, draft_len=4,
                   max_tree_tokens=64)
    st = out.stats
    assert out.tokens == ref
    assert (st.steps, st.step_tokens, st.accepted_tokens, st.proposed_tokens) == (4, 20, 16, 16)
    assert st.accepted_length == 5.0 and st.acceptance_rate == 1.0
    # three drafts of 4 tokens share 2 tokens (partly/truth) -> root + 4 + 2 + 4 nodes per step
    assert st.tree_tokens == 4 * 11


def test_generation_config_processors_are_refused():
    model, tok = make_tiny_model("llama")
    model.generation_config.repetition_penalty = 1.1
    try:
        with pytest.raises(ValueError, match="repetition_penalty=1.1"):
            generate(model, tok, None, PROMPT, max_new_tokens=4, drafter="prompt_lookup",
                     budget="fixed")
    finally:
        model.generation_config.repetition_penalty = 1.0
    ids = tok(PROMPT)["input_ids"]
    out = generate(model, tok, None, ids, max_new_tokens=8, drafter="prompt_lookup",
                   budget="fixed")
    assert out.tokens == greedy_reference(model, ids, 8)
