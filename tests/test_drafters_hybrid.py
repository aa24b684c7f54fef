"""Hybrid drafting: the context drafter, the composite drafter, and lossless decoding with them."""

import numpy as np
import pytest
import torch

# The real default model's store (an integration fixture), shared rather than rebuilt here.
from test_runtime_integration import PROMPT as INTEGRATION_PROMPT
from test_runtime_integration import default_store  # noqa: F401
from tiny_models import greedy_reference, save_flat_calibration

from dresd.budget import CalibratedBudget, FixedBudget
from dresd.calibrate import Calibration
from dresd.decode import DecodeConfig, as_drafter, generate
from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.candidates import path_products
from dresd.drafters.composite import CompositeDrafter, SourceStats, _PendingStep
from dresd.drafters.context import ContextDrafter
from dresd.models import load_model
from dresd.tree import DraftTree, TreeBudget

# Repeats itself, so drafts from the live context get accepted.
LOOP_PROMPT = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = "
CPU = Calibration("fp", "cpu-test", 300, (1, 4, 16, 32, 64), (0.062, 0.104, 0.134, 0.159, 0.229))
# The drafting time per step every composite here is given: the measured one (drafting_s=None)
# would make the calibrated budget's tree sizes follow the machine's load.
DRAFTING_S = 0.001


def fixed_time(composite: CompositeDrafter) -> CompositeDrafter:
    """The same sources, budget and memory, drafting at ``DRAFTING_S`` per step."""
    return CompositeDrafter(composite.drafters, composite.policy, memory=composite.memory,
                            drafting_s=DRAFTING_S)


def occurs_in(needle, hay) -> bool:
    n = len(needle)
    return any(tuple(hay[i : i + n]) == tuple(needle) for i in range(len(hay) - n + 1))


# ------------------------------------------------------------------------------ context drafter


def test_context_drafter_first_token_filter_and_committed_values():
    rng = np.random.default_rng(0)
    states = torch.tensor(rng.standard_normal((8, 16)), dtype=torch.float32)
    prompt = [5, 7, 9, 5, 8, 3, 5, 7]  # hidden row i predicted prompt[i + 1]
    d = ContextDrafter(k=10)
    d.begin(prompt, states)
    assert d.num_keys == 7  # the last state predicted y, which is not committed yet

    def ask(y, query, num=10, length=10):
        return d.propose(DraftRequest(d.tokens + [y], query, num, length))

    # The state that predicted 7 is the query, but y = 8: only keys followed by 8 count.
    assert [x.tokens for x in ask(8, states[0])] == [(3, 5, 7)]
    # y = 7: the nearest key (row 0) drafts what followed; the key at row 6 is followed by the
    # prompt's last token, so it has nothing committed to offer.
    drafts = ask(7, states[0])
    assert [x.tokens for x in drafts] == [(9, 5, 8, 3, 5, 7)]
    assert drafts[0].score == pytest.approx(1.0, abs=1e-5)
    assert ask(7, states[0], length=2)[0].tokens == (9, 5)
    # y = 5 (keys at rows 2 and 5): values stop at the committed text; y itself is not in it.
    got = {x.tokens for x in ask(5, states[2])}
    assert got == {(8, 3, 5, 7), (7,)}
    assert [x.tokens for x in ask(5, states[5])][0] == (7,)  # the nearest first
    assert len(ask(5, states[5], num=1)) == 1
    assert ask(4, states[0]) == []  # nothing committed is followed by 4

    # Commit y = 5 and one accepted token 6: the state that predicted 5 becomes a key.
    more = torch.tensor(rng.standard_normal((2, 16)), dtype=torch.float32)
    d.accept([5, 6], more)
    assert d.tokens == prompt + [5, 6] and d.num_keys == 9
    got = {x.tokens for x in ask(5, states[7])}
    assert got == {(8, 3, 5, 7, 5, 6), (7, 5, 6), (6,)}
    assert ask(5, states[7])[0].tokens == (6,)  # states[7] predicted that 5: an exact match
    assert [x.tokens for x in ask(6, more[0])] == []  # 6 is the last committed token
    with pytest.raises(RuntimeError, match="committed tokens plus y"):
        d.propose(DraftRequest(prompt + [5], states[0], 4, 4))


def test_context_drafter_uses_the_store_transform():
    from dresd.transform import fit_transform

    rng = np.random.default_rng(1)
    sample = rng.standard_normal((200, 16)).astype(np.float32)
    t = fit_transform(sample, 4)
    d = ContextDrafter(t)
    keys = d.embed(torch.from_numpy(sample[:5]))
    assert keys.shape == (5, 4)
    np.testing.assert_allclose(keys, t(sample[:5]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1, atol=1e-5)


class Recorder(Drafter):
    """Checks, at every step, that the wrapped context drafter drafts committed text only."""

    def __init__(self, inner: ContextDrafter):
        self.inner = inner
        self.name = inner.name
        self.steps = 0
        self.drafted = 0

    def begin(self, prompt_tokens, prompt_hidden):
        self.inner.begin(prompt_tokens, prompt_hidden)

    def propose(self, request):
        committed = list(request.tokens[:-1])
        assert self.inner.tokens == committed
        assert self.inner.num_keys == len(committed) - 1
        drafts = self.inner.propose(request)
        y = request.tokens[-1]
        for d in drafts:
            # y and what the draft puts after it were written, in that order, in committed text
            assert occurs_in((y,) + d.tokens, committed)
        self.steps += 1
        self.drafted += bool(drafts)
        return drafts

    def accept(self, tokens, hidden):
        self.inner.accept(tokens, hidden)


def test_context_drafter_never_drafts_uncommitted_tokens_while_decoding(tiny_model):
    model, tok = tiny_model
    ids = tok(LOOP_PROMPT)["input_ids"]
    ref = greedy_reference(model, ids, 40)
    rec = Recorder(ContextDrafter(k=4))
    res = generate(model, tok, rec, ids, max_new_tokens=40, num_drafts=4, draft_len=6)
    assert res.tokens == ref
    # (a last step with one token left to emit asks for no drafts)
    assert res.stats.steps - 1 <= rec.steps <= res.stats.steps and rec.drafted > 0
    assert res.stats.accepted_tokens > 0


# ---------------------------------------------------------------------------- composite drafter


class Scripted(Drafter):
    """Drafts from a function of the step's position in a known token sequence."""

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn

    def propose(self, request):
        return self.fn(len(request.tokens) - 1, request)


def simulate(composite, truth, num_drafts, draft_len, max_tree_tokens, steps, check=None):
    """Drive ``composite`` as the decoder would, with ``truth`` as the model's greedy text;
    returns the per-step tree nodes each source contributed."""
    hidden = torch.zeros(1, 4)
    composite.begin(truth[:1], hidden)
    i, per_step = 1, []
    budget = TreeBudget(num_drafts, draft_len, max_tree_tokens)
    for _ in range(steps):
        if i + 1 >= len(truth):
            break
        before = [s.tree_nodes for s in composite.stats]
        req = DraftRequest(truth[: i + 1], hidden[0], num_drafts, draft_len)
        drafts = composite.propose(req)
        tree = DraftTree.build(truth[i], drafts, budget)
        if check:
            check(req, drafts, tree)
        node, accepted = 0, []
        while (c := tree.children(node).get(truth[i + 1 + len(accepted)])) is not None:
            accepted.append(truth[i + 1 + len(accepted)])
            node = c
        composite.accept([truth[i]] + accepted, torch.zeros(len(accepted) + 1, 4))
        i += 1 + len(accepted)
        per_step.append([s.tree_nodes - b for s, b in zip(composite.stats, before)])
    return np.array(per_step)


def check_tree(policy, num_drafts, draft_len, proposed):
    """The composite's drafts form a valid trie that fits every budget, is not cut by the
    decoder, and only holds tokens some source proposed."""

    def check(req, drafts, tree):
        unlimited = DraftTree.build(req.tokens[-1], drafts, TreeBudget(10**6, 10**6, 10**6))
        assert len(tree) == len(unlimited)  # the decoder's budget cuts nothing
        assert len(tree) <= policy.max_tree_tokens
        assert len(drafts) <= num_drafts and all(0 < len(d.tokens) <= draft_len for d in drafts)
        seen = set()
        for i in range(1, len(tree)):
            p = tree.parents[i]
            assert 0 <= p < i and tree.depths[i] == tree.depths[p] + 1
            assert (p, tree.tokens[i]) not in seen  # no duplicate children
            seen.add((p, tree.tokens[i]))
        # every root-to-leaf path is a prefix of something a source proposed
        sources = [d.tokens for d in proposed[-1]]
        for d in drafts:
            assert any(s[: len(d.tokens)] == d.tokens for s in sources)

    return check


def drive_noisy_sources(policy, shape, drafting_s) -> CompositeDrafter:
    """40 steps of a composite of three noisy sources over three letters, every tree checked
    by ``check_tree``; the composite."""
    num_drafts, draft_len = shape
    rng = np.random.default_rng(len(repr(policy)) + num_drafts)
    truth = rng.integers(0, 3, 1000).tolist()  # three letters: drafts collide and share prefixes
    proposed = []

    def noisy(name, flip):
        def fn(i, req):
            out = []
            for _ in range(int(rng.integers(0, 6))):
                toks = [t if rng.random() > flip else int(rng.integers(0, 3))
                        for t in truth[i + 1 : i + 1 + req.draft_len]]
                out.append(Draft(tuple(toks[: int(rng.integers(1, req.draft_len + 1))]),
                                 float(rng.random()), name))
            proposed[-1].extend(out)
            return out
        return Scripted(name, fn)

    sources = [noisy("a", 0.1), noisy("b", 0.5), noisy("c", 1.0)]
    comp = CompositeDrafter(sources, policy, drafting_s=drafting_s)
    orig = comp.propose

    def propose(req):
        proposed.append([])
        return orig(req)

    comp.propose = propose
    check = check_tree(policy, num_drafts, draft_len, proposed)
    simulate(comp, truth, num_drafts, draft_len, policy.max_tree_tokens, 40, check)
    assert len(comp.tree_sizes) == 40
    return comp


@pytest.mark.parametrize("policy", [FixedBudget(1), FixedBudget(2), FixedBudget(8),
                                    FixedBudget(32), CalibratedBudget(CPU, 32)],
                         ids=["fixed1", "fixed2", "fixed8", "fixed32", "calibrated"])
@pytest.mark.parametrize("shape", [(1, 7), (4, 8), (10, 10)], ids=["1x7", "4x8", "10x10"])
def test_composite_trees_are_valid_tries_within_budget(policy, shape):
    num_drafts, draft_len = shape
    comp = drive_noisy_sources(policy, shape, DRAFTING_S)
    if isinstance(policy, FixedBudget):
        # a fixed budget fills up when the sources offer enough nodes
        cap = min(policy.max_tree_tokens - 1, num_drafts * draft_len)
        assert max(comp.tree_sizes) >= (cap if cap <= 7 else cap // 2)


def test_a_measured_drafting_time_still_gives_valid_trees():
    """``drafting_s=None`` (generate's composites) measures each step's drafting time instead.
    What the calibrated budget keeps then follows the machine's load, so only what holds
    whatever was measured is checked: every tree is a valid trie within the budget, and a
    time was measured."""
    comp = drive_noisy_sources(CalibratedBudget(CPU, 32), (10, 10), None)
    assert comp.drafting_s is None and comp._overhead_s > 0
    assert all(0 <= n < 32 for n in comp.tree_sizes)


def test_shared_prefixes_are_merged():
    same = (4, 5, 6)
    sources = [Scripted(n, lambda i, r, n=n: [Draft(same, 0.5, n), Draft((4, 9), 0.1, n)])
               for n in ("a", "b", "c")]
    comp = CompositeDrafter(sources, FixedBudget(64), drafting_s=DRAFTING_S)
    comp.begin([1], torch.zeros(1, 4))
    drafts = comp.propose(DraftRequest([1, 2], torch.zeros(4), 10, 10))
    assert sorted(d.tokens for d in drafts) == [(4, 5, 6), (4, 9)]
    assert len(DraftTree.build(2, drafts, TreeBudget(10, 10, 64))) == 5
    # proposed by three sources, the shared node is likelier than by one
    assert drafts[0].tokens == same and drafts[0].source == "a+b+c"
    assert [s.tree_nodes for s in comp.stats] == [4, 4, 4]


@pytest.mark.parametrize("policy", [CalibratedBudget(CPU, 32), FixedBudget(16)],
                         ids=["calibrated", "fixed"])
def test_a_source_that_stops_helping_stops_costing(policy):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 50, 2000).tolist()
    switch = 60  # source "early" is right before this step, "late" after it

    def make(name, right_when):
        def fn(i, req):
            good = truth[i + 1 : i + 1 + req.draft_len]
            if right_when(len(calls)):
                return [Draft(tuple(good), 1.0, name)]
            return [Draft(tuple((t + 1 + j) % 50 for t in good), 1.0, name) for j in range(3)]
        return Scripted(name, fn)

    calls = []
    early = make("early", lambda step: step < switch)
    late = make("late", lambda step: step >= switch)
    comp = CompositeDrafter([early, late], policy, drafting_s=DRAFTING_S)
    orig = comp.propose
    comp.propose = lambda req: calls.append(1) or orig(req)
    nodes = simulate(comp, truth, 4, 6, policy.max_tree_tokens, 160)
    assert len(nodes) == 160
    first, last = nodes[20:switch].sum(0), nodes[-40:].sum(0)
    assert first[0] > 5 * 20 and last[1] > 5 * 40  # the right source fills its draft
    if isinstance(policy, CalibratedBudget):
        assert first[1] == 0 and last[0] == 0  # the wrong one gets no nodes at all
    else:
        # a fixed budget is spent anyway, but a source wrong 16 steps in a row is muted and
        # only probed every 8 steps
        assert last[0] <= 40 / 8 * 3 * 6
    assert comp.stats[0].calls < 120 and comp.stats[1].calls < 160
    summary = comp.source_summary()
    assert summary["late"]["hit_rate"] > 0.85 and summary["early"]["hit_rate"] < 0.25
    assert summary["late"]["accepted"] > summary["early"]["accepted"] > 0


@pytest.mark.parametrize("copies", [1, 2])
def test_composite_estimates_match_what_is_accepted(copies):
    """A source right at each depth with probability 0.6 (given it was right so far): the
    composite's expected accepted tokens track the accepted ones, and a second source proposing
    the very same drafts is not counted as independent evidence."""
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 50, 5000).tolist()
    drafts = {}

    def fn(i, req):
        if i not in drafts:  # the same draft for every copy of the source
            toks, right = [], True
            for t in truth[i + 1 : i + 1 + req.draft_len]:
                right = right and rng.random() < 0.6
                toks.append(t if right else (t + 1) % 50)
            drafts[i] = [Draft(tuple(toks), 1.0, "s")]
        return drafts[i]

    comp = CompositeDrafter([Scripted(f"s{j}", fn) for j in range(copies)], FixedBudget(9),
                            drafting_s=DRAFTING_S)
    accepted = []
    orig = comp.accept
    comp.accept = lambda tokens, hidden: accepted.append(len(tokens) - 1) or orig(tokens, hidden)
    simulate(comp, truth, 1, 8, 9, 400)
    expected, got = sum(comp.expected[50:]), sum(accepted[50:])
    assert got == pytest.approx(sum(0.6**d for d in range(1, 9)) * 350, rel=0.15)
    assert expected == pytest.approx(got, rel=0.2)


def test_draft_scores_file_steps_into_bands_with_their_own_hit_rates():
    """A source whose drafts are right when it scores them high and wrong when low: the band
    estimates tell the two apart, while the pooled estimate sits between."""
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 50, 3000).tolist()

    def fn(i, req):
        good = truth[i + 1 : i + 1 + req.draft_len]
        if i % 2:
            return [Draft(tuple(good), 0.95, "s")]
        return [Draft(tuple((t + 1) % 50 for t in good), 0.3, "s")]

    comp = CompositeDrafter([Scripted("s", fn)], FixedBudget(9), mute_after=0,
                            drafting_s=DRAFTING_S)
    simulate(comp, truth, 1, 8, 9, 300)
    high = comp.band([Draft((1,), 0.95)])
    low = comp.band([Draft((1,), 0.3)])
    assert (low, high) == (0, 3)
    assert set(comp.stats[0].bands) == {low, high}
    rates = [comp.hit_rates(0, 1, b)[0] for b in (low, high)]
    pooled = comp.hit_rates(0, 1)[0]
    assert rates[0] < 0.2 < pooled < 0.8 < rates[1]
    # with one band (no edges) the scores are ignored
    flat = CompositeDrafter([Scripted("s", fn)], FixedBudget(9), mute_after=0, score_bands=(),
                            drafting_s=DRAFTING_S)
    simulate(flat, truth, 1, 8, 9, 300)
    assert flat.band([Draft((1,), 0.95)]) == flat.band([Draft((1,), 0.3)]) == 0


def test_node_estimates_are_recalibrated_by_how_often_such_nodes_are_accepted():
    """Two drafts per step, the first always right and the second always wrong: per depth the
    estimates add up (one token accepted per depth), but the rank shares put 2/3 on the first
    branch and 1/3 on the second. Scored against the verified nodes, the reliability map
    raises the first branch to about 1 and sinks the second."""
    rng = np.random.default_rng(9)
    truth = rng.integers(0, 50, 3000).tolist()

    def fn(i, req):
        good = truth[i + 1 : i + 1 + req.draft_len]
        return [Draft(tuple(good), 0.5, "s"), Draft(tuple((t + 1) % 50 for t in good), 0.4, "s")]

    comp = CompositeDrafter([Scripted("s", fn)], FixedBudget(16), mute_after=0,
                            drafting_s=DRAFTING_S)
    simulate(comp, truth, 2, 4, 16, 200)
    ratios = comp.reliability_ratios()
    top, second = (int(np.searchsorted(comp.reliability_bins, p, "right")) for p in (2 / 3, 1 / 3))
    assert ratios[top] > 1.3 and ratios[second] < 0.15
    # the next step's drafts carry the recalibrated estimates of their leaves
    drafts = comp.propose(DraftRequest(truth[:11], torch.zeros(4), 2, 4))
    scores = {d.tokens[0]: d.score for d in drafts}
    assert scores[truth[11]] > 0.9 and scores[(truth[11] + 1) % 50] < 0.1


def test_estimates_carry_over_to_the_next_generation():
    """A second generation, by the same composite or by a new one sharing its memory, starts
    from the estimates the first ended with; the per-generation counters start at 0."""
    rng = np.random.default_rng(8)
    truth = rng.integers(0, 50, 2000).tolist()

    def fn(i, req):  # right for 2 tokens, then wrong
        good = truth[i + 1 : i + 1 + req.draft_len]
        return [Draft(tuple(good[:2]) + tuple((t + 1) % 50 for t in good[2:]), 1.0, "s")]

    memory: dict = {}
    first = CompositeDrafter([Scripted("s", fn)], FixedBudget(9), memory=memory,
                             drafting_s=DRAFTING_S)
    simulate(first, truth, 1, 8, 9, 100)
    learned = first.hit_rates(0, 3)
    assert learned[0] > 0.9 and learned[2] < 0.2
    whole = CompositeDrafter([Scripted("s", fn)], FixedBudget(9), memory=dict(memory),
                             carry_over=1.0, drafting_s=DRAFTING_S)
    whole.begin([1], torch.zeros(1, 4))
    assert np.allclose(whole.hit_rates(0, 3), learned, atol=0.02)
    fresh = CompositeDrafter([Scripted("s", fn)], FixedBudget(9), drafting_s=DRAFTING_S)
    fresh.begin([1], torch.zeros(1, 4))
    assert np.allclose(fresh.hit_rates(0, 3), 0.5)  # the prior
    for again in (first, CompositeDrafter([Scripted("s", fn)], FixedBudget(9), memory=memory,
                                          drafting_s=DRAFTING_S)):
        before = again.hit_rates(0, 3)
        again.begin([1], torch.zeros(1, 4))
        # the evidence goes on at half weight (carry_over), so each generation moves the
        # estimates toward the prior without losing what was learned
        now = again.hit_rates(0, 3)
        assert np.all(np.abs(now - 0.5) < np.abs(before - 0.5))
        assert now[0] > 0.7 and now[2] < 0.45  # (the second loop is a third generation)
        assert again.stats[0].calls == 0 and again.steps == 0
    # other sources (another configuration) do not take them over
    other = CompositeDrafter([Scripted("t", fn)], FixedBudget(9), memory=memory,
                             drafting_s=DRAFTING_S)
    other.begin([1], torch.zeros(1, 4))
    assert np.allclose(other.hit_rates(0, 3), 0.5)


def chain_source(truth, rate, rng, cache):
    """Drafts right at each depth with probability ``rate``, given right so far (one per step)."""

    def fn(i, req):
        if (i, rate[0]) not in cache:
            toks, ok = [], True
            for t in truth[i + 1 : i + 1 + req.draft_len]:
                ok = ok and rng.random() < rate[0]
                toks.append(t if ok else (t + 1) % 50)
            cache[(i, rate[0])] = [Draft(tuple(toks), 1.0, "s")]
        return cache[(i, rate[0])]

    return fn


def test_a_source_written_off_by_failed_requests_drafts_again():
    """Two requests on which the source is always wrong (its trees verified and rejected), then
    requests on which it is right 70% per depth: under the calibrated budget it gets nodes
    again within a few steps, and keeps them."""
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 50, 3000).tolist()
    rate = [0.0]
    fn = chain_source(truth, rate, rng, {})
    memory: dict = {}
    for _ in range(2):
        simulate(CompositeDrafter([Scripted("s", fn)], FixedBudget(16), memory=memory,
                                  drafting_s=DRAFTING_S), truth, 4, 6, 16, 16)
    rate[0] = 0.7
    comp = CompositeDrafter([Scripted("s", fn)], CalibratedBudget(CPU, 32), memory=memory,
                            drafting_s=DRAFTING_S)
    nodes = simulate(comp, truth, 4, 6, 32, 60)[:, 0]
    assert nodes[:8].max() > 0  # within 8 steps
    assert nodes[8:].mean() > 4


def test_estimates_written_down_by_verified_trees_heal():
    """The state a run of rejected trees leaves behind: every depth and every reliability bin
    saying a node is accepted at a twentieth of its estimate, low enough that the calibrated
    budget verifies nothing. Learning from verified trees alone, nothing would ever change it;
    scored against the text, the source's drafts bring it back within a bounded number of
    steps."""
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 50, 3000).tolist()
    right = Scripted("s", lambda i, req: [Draft(tuple(truth[i + 1 : i + 1 + req.draft_len]))])
    memory: dict = {}
    comp = CompositeDrafter([right], CalibratedBudget(CPU, 32), memory=memory,
                            drafting_s=DRAFTING_S)
    comp.begin([1], torch.zeros(1, 4))
    memory["depth_fit"] = SourceStats("tree", np.full(6, 0.5), np.full(6, 10.0))
    memory["reliability"][:] = [[0.5] * 9, [10.0] * 9]
    comp = CompositeDrafter([right], CalibratedBudget(CPU, 32), memory=memory, carry_over=1.0,
                            drafting_s=DRAFTING_S)
    nodes = simulate(comp, truth, 4, 6, 32, 40)[:, 0]
    assert nodes[:3].sum() == 0  # locked at first
    # tree_decay 0.98: back after 19 steps (0.9: 12)
    assert nodes[:24].max() > 0 and nodes[24:].min() == 6  # drafting again, the whole draft


# ------------------------------------------------------------------------ lossless, end to end


FAMILY_PROMPT = "def parse_args(argv):\n    parser = "


@pytest.fixture(scope="module")
def family_stores(tiny_model_dirs, tmp_path_factory):
    """family -> (store path, model, tokenizer, greedy reference): a small store per family
    holding a stdlib file and the model's own greedy continuation of the prompt."""
    from tiny_models import stdlib_files

    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    out = {}
    for family, model_dir in tiny_model_dirs.items():
        model, tok = load_model(model_dir)
        ids = tok(FAMILY_PROMPT)["input_ids"]
        ref = greedy_reference(model, ids, 40)
        corpus = tmp_path_factory.mktemp(f"corpus-{family}")
        (corpus / "lib.txt").write_text(stdlib_files(3)[0].read_text()[:3000])
        (corpus / "own.txt").write_text(tok.decode(ids + ref, skip_special_tokens=True))
        store = tmp_path_factory.mktemp(f"store-{family}") / "s"
        build_store(corpus, store, BuildConfig(model=str(model_dir), dim=16, value_len=12,
                                               sample_size=500, progress=False))
        out[family] = (store, model, tok, ref)
    return out


@pytest.fixture
def calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_default_generate_is_the_lossless_hybrid(family, family_stores, calibration_cache):
    from dresd.drafters.dense import StoreDrafter
    from dresd.drafters.prompt_lookup import PromptLookupDrafter
    from dresd.store import load_store

    path, model, tok, ref = family_stores[family]
    store = load_store(path, model, tok)
    save_flat_calibration(model, store.manifest.model.fingerprint)
    drafter = as_drafter(store, DecodeConfig(), model, tok)
    assert isinstance(drafter, CompositeDrafter)
    assert [type(d) for d in drafter.drafters] == [StoreDrafter, ContextDrafter,
                                                   PromptLookupDrafter]
    assert isinstance(drafter.policy, CalibratedBudget)
    # generate's own composite measures its drafting time: only what timing cannot change
    assert generate(model, tok, store, FAMILY_PROMPT, max_new_tokens=40).tokens == ref
    res = generate(model, tok, fixed_time(drafter), FAMILY_PROMPT, max_new_tokens=40)
    assert res.tokens == ref
    assert res.stats.accepted_tokens > 0 and res.stats.accepted_length > 1


def test_the_decoder_reports_every_verify_pass_to_the_budget(family_stores, calibration_cache):
    from dresd.store import load_store

    path, model, tok, ref = family_stores["llama"]
    store = load_store(path, model, tok)
    save_flat_calibration(model, store.manifest.model.fingerprint)
    drafter = fixed_time(as_drafter(store, DecodeConfig(), model, tok))
    seen = []
    observe = drafter.policy.observe
    drafter.policy.observe = lambda n, s: seen.append((n, s)) or observe(n, s)
    res = generate(model, tok, drafter, FAMILY_PROMPT, max_new_tokens=40)
    assert res.tokens == ref
    assert len(seen) == res.stats.steps and sum(n for n, _ in seen) == res.stats.tree_tokens
    assert 0 < sum(s for _, s in seen) <= res.stats.verify_s * 1.0001
    measured = drafter.policy.costs.measured
    assert set(measured) == {n for n, _ in seen} and all(v > 0 for v in measured.values())


def test_generate_shares_estimates_only_through_a_memory_the_caller_passes(family_stores,
                                                                         calibration_cache):
    """Composites learn from their own generations only, unless the caller hands them one
    memory: then a composite starts from what the others learned."""
    from dresd.store import load_store

    path, model, tok, ref = family_stores["llama"]
    store = load_store(path, model, tok)
    save_flat_calibration(model, store.manifest.model.fingerprint)
    config = DecodeConfig()
    assert (as_drafter(store, config, model, tok).memory
            is not as_drafter(store, config, model, tok).memory)
    shared: dict = {}
    first = fixed_time(as_drafter(store, config, model, tok, memory=shared))
    assert first.memory is shared
    assert generate(model, tok, first, FAMILY_PROMPT, max_new_tokens=40).tokens == ref
    learned = [st.tests.copy() for st in shared["stats"]]  # what that generation learned
    assert [st.name for st in shared["stats"]] == first.names and sum(learned[0]) > 0
    # a generate call that builds its own composite neither reads nor changes them
    assert generate(model, tok, store, FAMILY_PROMPT, max_new_tokens=40).tokens == ref
    assert all(np.array_equal(st.tests, t) for st, t in zip(shared["stats"], learned))
    assert all(st.tests.sum() == 0 for st in as_drafter(store, config, model, tok).stats)
    second = fixed_time(as_drafter(store, config, model, tok, memory=shared))
    assert all(np.array_equal(st.tests, t) for st, t in zip(second.stats, learned))
    again = generate(model, tok, second, FAMILY_PROMPT, max_new_tokens=40)
    assert again.tokens == ref  # still lossless, starting from the learned estimates


@pytest.mark.parametrize("spec,budget", [("context", "fixed"), ("rest,prompt_lookup", "fixed"),
                                         ("dense,context", "calibrated"), ("hybrid", "fixed")])
def test_every_source_and_policy_stays_selectable(spec, budget, family_stores,
                                                  calibration_cache):
    from dresd.store import load_store

    path, model, tok, ref = family_stores["llama"]
    store = load_store(path, model, tok, verify=False)
    res = generate(model, tok, store, FAMILY_PROMPT, max_new_tokens=40, drafter=spec,
                   budget=budget, num_drafts=4, draft_len=8, max_tree_tokens=16)
    assert res.tokens == ref
    assert res.stats.tree_tokens <= 16 * res.stats.steps
    # store-free sources decode without a store
    if spec == "context":
        assert generate(model, tok, None, FAMILY_PROMPT, max_new_tokens=40, drafter=spec,
                        budget=budget).tokens == ref


def test_drafter_selection_errors(family_stores):
    path, model, tok, _ = family_stores["llama"]
    with pytest.raises(ValueError, match="drafter must be"):
        DecodeConfig(drafter="dense,sparse")
    with pytest.raises(ValueError, match="budget must be"):
        DecodeConfig(budget="greedy")
    with pytest.raises(ValueError, match="dense drafter needs a store"):
        generate(model, tok, None, FAMILY_PROMPT, max_new_tokens=4, drafter="dense")


# ---------------------------------------------------------------------- the real default model


@pytest.mark.integration
def test_default_model_hybrid_is_lossless(default_store, tmp_path, monkeypatch):  # noqa: F811
    from dresd.decode import as_drafter
    from dresd.store import load_store

    model, tok = load_model("default")
    store = load_store(default_store, model, tok)
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    # A saved flat calibration, not one measured now, so the acceptance check below does not
    # depend on the machine's load.
    save_flat_calibration(model, store.manifest.model.fingerprint)
    drafter = as_drafter(store, DecodeConfig(), model, tok)
    assert isinstance(drafter, CompositeDrafter) and len(drafter.drafters) == 3
    assert isinstance(drafter.policy, CalibratedBudget)
    msgs = [{"role": "user", "content": "Complete this Python function.\n\n" + INTEGRATION_PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    ref = greedy_reference(model, ids, 48)
    res = generate(model, tok, fixed_time(drafter), msgs, max_new_tokens=48)
    assert res.tokens == ref
    assert res.stats.steps < len(ref) and res.stats.accepted_length > 1


def test_cli_generate_without_a_store(tiny_llama_dir, family_stores, calibration_cache, capsys):
    from dresd.cli import main

    _, _, tok, ref = family_stores["llama"]
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", FAMILY_PROMPT,
               "--max-new-tokens", "20", "--compare"])  # hybrid: context + prompt lookup
    out = capsys.readouterr().out
    assert rc == 0 and "plain greedy: identical" in out and "store:" not in out
    assert out.startswith(tok.decode(ref[:20], skip_special_tokens=True))
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--drafter", "dense"])
    assert rc == 2 and "dense drafter needs a store" in capsys.readouterr().err


@pytest.mark.parametrize("policy", [lambda: FixedBudget(12), lambda: CalibratedBudget(CPU, 32)],
                         ids=["fixed", "calibrated"])
def test_the_tree_handed_to_the_decoder_is_the_merge_of_the_leaf_drafts(policy):
    """propose_tree and DraftTree.build(propose(...)) give the same tree node for node, so
    handing the tree over changes neither greedy nor seeded sampled decoding."""
    truth = np.random.default_rng(1).integers(0, 3, 400).tolist()

    def composite():
        rng = np.random.default_rng(7)

        def fn(i, req):
            return [Draft(tuple(t if rng.random() > 0.3 else int(rng.integers(0, 3))
                                for t in truth[i + 1 : i + 1 + int(rng.integers(1, 6))]),
                          float(rng.random()), "s") for _ in range(int(rng.integers(0, 5)))]
        return CompositeDrafter([Scripted("a", fn), Scripted("b", fn)], policy(),
                                drafting_s=DRAFTING_S)

    budget = TreeBudget(4, 5, 12)
    trees = []
    for handed in (False, True):
        comp = composite()
        comp.begin(truth[:1], torch.zeros(1, 4))
        got, i = [], 1
        while i + 1 < len(truth):
            req = DraftRequest(truth[: i + 1], torch.zeros(4), 4, 5)
            tree = (comp.propose_tree(req, budget) if handed
                    else DraftTree.build(truth[i], comp.propose(req), budget))
            node, n = 0, 0
            while (i + 1 + n < len(truth)
                   and (c := tree.children(node).get(truth[i + 1 + n])) is not None):
                node, n = c, n + 1
            comp.accept(truth[i : i + 1 + n], torch.zeros(n + 1, 4))
            got.append((tree.tokens, tree.parents))
            i += 1 + n
        trees.append(got)
    assert trees[0] == trees[1] and any(len(t[0]) > 1 for t in trees[0])


def test_the_node_model_learns_what_the_hand_built_estimate_misses():
    """Each step a source proposes three drafts: its best-scored one is wrong, and the two
    others share their (right) first token. By rank weight the wrong node looks likelier (1
    against 1/2 + 1/3), so the hand-built estimate verifies it; the node model sees two drafts
    through the right node and learns within a few dozen steps that this is what counts."""
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 50, 3000).tolist()

    def fn(i, req):
        good = truth[i + 1 : i + 1 + req.draft_len]
        wrong = tuple((t + 1) % 50 for t in good)
        return [Draft(wrong, 0.9, "s"), Draft(tuple(good), 0.5, "s"),
                Draft(tuple(good[:1]) + wrong[1:], 0.4, "s")]

    accepted = {}
    for learned in (True, False):
        comp = CompositeDrafter([Scripted("s", fn)], FixedBudget(2), mute_after=0,
                                node_model=learned, drafting_s=DRAFTING_S)
        counts = []
        orig = comp.accept
        comp.accept = lambda tokens, hidden, orig=orig, counts=counts: (
            counts.append(len(tokens) - 1) or orig(tokens, hidden))
        simulate(comp, truth, 3, 4, 2, 300)
        accepted[learned] = float(np.mean(counts[100:]))
        assert comp.node_model.fitted == learned  # off, it neither learns nor costs
    assert accepted[True] > 0.95 and accepted[False] < 0.05


def test_node_model_examples_are_the_decided_nodes_whose_parent_was_right():
    comp = CompositeDrafter([Scripted("s", lambda i, r: [])], drafting_s=DRAFTING_S)
    got = []
    comp.node_model.add = lambda x, y: got.append((x[:, 0].tolist(), y.tolist()))
    paths = [(5,), (5, 6), (5, 7), (8,), (8, 9), (5, 6, 1)]
    rows = np.arange(len(paths), dtype=float)[:, None] * np.ones((1, comp.num_features))
    step = _PendingStep(0, [None], [None], nodes=[(p, 0.1, 0.1, 0) for p in paths],
                        features=rows)
    comp._score_tree(step, (5, 6))  # (5, 6, 1) is undecided, (8, 9)'s parent was wrong
    assert got == [([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 0.0])]


def test_node_estimates_are_path_products_sharing_one_token():
    tree = DraftTree(0)
    a = tree.child(0, 1)
    b, c = tree.child(a, 2), tree.child(a, 3)
    d = tree.child(0, 4)
    probs = path_products(tree, np.array([1.0, 0.8, 0.9, 0.6, 0.6]))
    assert probs[a] == pytest.approx(0.8 / 1.4) and probs[d] == pytest.approx(0.6 / 1.4)
    assert probs[b] == pytest.approx(probs[a] * 0.9 / 1.5)
    assert probs[b] + probs[c] <= probs[a] + 1e-12


def test_node_model_feature_rows_follow_the_candidate_nodes():
    src = Scripted("s", lambda i, r: [Draft((1, 2, 3), 0.9), Draft((1, 4), 0.5),
                                      Draft((7,), 0.3)])
    comp = CompositeDrafter([src], drafting_s=DRAFTING_S)
    comp.begin([0], torch.zeros(1, 4))
    comp.propose(DraftRequest([0, 9], torch.zeros(4), 3, 3))
    step = comp._pending[-1]
    assert [p for p, *_ in step.nodes] == [(1,), (1, 2), (1, 2, 3), (1, 4), (7,)]
    assert step.features[:, 0].tolist() == [1, 2, 3, 2, 1]  # depth
    assert step.features[:, 1].tolist() == [2, 2, 1, 2, 2]  # siblings
    assert step.features[:, 6].tolist() == [0.9, 0.9, 0.9, 0.5, 0.3]  # best draft score
    assert step.features[:, 7].tolist() == pytest.approx(np.log1p([2, 1, 1, 1, 1]).tolist())
    off = CompositeDrafter([src], node_model=False, drafting_s=DRAFTING_S)
    off.begin([0], torch.zeros(1, 4))
    off.propose(DraftRequest([0, 9], torch.zeros(4), 3, 3))
    assert off._pending[-1].features is None  # nothing built for a model that is not used


def test_carry_over_zero_starts_the_node_model_over():
    kept, fresh = (CompositeDrafter([Scripted("s", lambda i, r: [])], carry_over=c,
                                    drafting_s=DRAFTING_S) for c in (0.5, 0.0))
    before = kept.node_model, fresh.node_model
    for comp in (kept, fresh):
        comp.begin([0], torch.zeros(1, 4))
    assert kept.node_model is before[0] and fresh.node_model is not before[1]
