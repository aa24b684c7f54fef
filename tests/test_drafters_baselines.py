"""Baseline drafters: prompt lookup, REST (suffix array) and the PyPI draftretriever, checked
against brute-force scans, on a builder-built store, and in lossless decoding."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_models import greedy_reference

from benchmarks.draftretriever import DraftRetrieverDrafter, build_draftretriever_index
from dresd.decode import generate
from dresd.drafters.base import DraftRequest
from dresd.drafters.prompt_lookup import PromptLookupDrafter
from dresd.drafters.rest import RestDrafter, build_rest_index, continuation_trie

H = torch.zeros(4)


def request(tokens, num_drafts=10, draft_len=10):
    return DraftRequest(list(tokens), H, num_drafts, draft_len)


def as_pairs(drafts):
    return [(d.tokens, pytest.approx(d.score)) for d in drafts]


# ------------------------------------------------------------------------------ prompt lookup


def brute_prompt_lookup(seq, max_n, min_n, num, dlen, max_matches):
    """Full rescan: n from long to short, most recent occurrence first, skipping a continuation
    that is a prefix of (or equal to) one already taken."""
    last = len(seq) - 1
    kept, out = [], []
    for n in range(min(max_n, len(seq)), min_n - 1, -1):
        pat = seq[len(seq) - n:]
        occ = [e for e in range(n - 1, last) if seq[e - n + 1 : e + 1] == pat]
        rank = 0
        for e in reversed(occ[len(occ) - max_matches:] if max_matches < len(occ) else occ):
            cont = tuple(seq[e + 1 : e + 1 + dlen])
            if any(k[: len(cont)] == cont for k in kept):
                continue
            kept.append(cont)
            out.append((cont, (n - 1 + 1 / (rank + 1)) / max_n))
            rank += 1
            if len(out) >= num:
                return out
    return out


def test_prompt_lookup_example_ranks_longer_and_newer_matches_first():
    d = PromptLookupDrafter(max_ngram=3)
    seq = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]
    d.begin(seq[:5], None)
    got = d.propose(request(seq, num_drafts=5, draft_len=3))
    # (1, 2, 3) ends at 6 and at 2: the newer one first; shorter n-grams find the same places.
    assert as_pairs(got) == [((5, 1, 2), 1.0), ((4, 1, 2), 2.5 / 3)]
    assert all(d.source == "prompt_lookup" for d in got)
    assert [x.tokens for x in d.propose(request(seq, 1, 2))] == [(5, 1)]
    # A unigram match only: the 3-gram and 2-gram ending in 9 never occurred.
    seq2 = seq + [7, 9, 8, 9]
    assert as_pairs(d.propose(request(seq2, 5, 2))) == [((8, 9), 1 / 3)]
    # No match at all, or none long enough.
    assert d.propose(request([5, 6, 7, 8])) == []
    assert PromptLookupDrafter(3, min_ngram=2).propose(request([1, 2, 1, 3, 1])) == []
    with pytest.raises(ValueError):
        PromptLookupDrafter(max_ngram=2, min_ngram=3)


@pytest.mark.parametrize("seed", range(6))
def test_prompt_lookup_equals_brute_force_across_decode_steps(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 8])
    max_n, min_n = rng.choice([(3, 1), (4, 2), (2, 2), (1, 1)])
    max_matches = rng.choice([2, 64])
    d = PromptLookupDrafter(max_n, min_n, max_matches=max_matches)
    for generation in range(2):  # the second begin() must forget the first sequence
        truth = [rng.randrange(vocab) for _ in range(120)]
        p = rng.randrange(1, 30)
        d.begin(truth[:p], None)
        seq = truth[: p + 1]  # prompt + y
        while len(seq) < len(truth):
            num, dlen = rng.randrange(1, 8), rng.randrange(1, 7)
            if rng.random() < 0.85:  # the decoder skips propose when no draft fits
                got = d.propose(request(seq, num, dlen))
                want = brute_prompt_lookup(seq, max_n, min_n, num, dlen, max_matches)
                assert as_pairs(got) == want, (generation, len(seq))
                assert all(t in seq for x in got for t in x.tokens)
            accepted = truth[len(seq) : len(seq) + rng.randrange(0, 4)]
            d.accept([seq[-1]] + accepted, None)
            seq = truth[: len(seq) + len(accepted) + 1]
        # Indexed: what was committed, each n-gram position once.
        indexed = d._seq
        assert len(indexed) >= len(seq) - 1 and indexed == truth[: len(indexed)]
        n_entries = sum(len(v) for v in d._ends.values())
        assert n_entries == sum(max(0, len(indexed) - n + 1) for n in range(min_n, max_n + 1))


def test_prompt_lookup_without_begin_and_on_a_new_sequence():
    d = PromptLookupDrafter()
    a = [4, 5, 6, 4, 5]
    assert [x.tokens for x in d.propose(request(a, 3, 2))] == [(6, 4)]
    b = [7, 8, 7]  # not a continuation of ``a``: re-indexed from scratch
    assert [x.tokens for x in d.propose(request(b, 3, 2))] == [(8, 7)]


# ----------------------------------------------------------------------------- REST


def brute_rest(docs, ctx, max_s, min_s, dlen):
    """Longest context suffix (min_s..max_s tokens) followed by a token inside some document,
    and the continuations (up to dlen tokens) after each of its occurrences."""
    for n in range(min(max_s, len(ctx)), min_s - 1, -1):
        pat = list(ctx[len(ctx) - n:])
        conts = [tuple(d[e + 1 : e + 1 + dlen]) for d in docs
                 for e in range(n - 1, len(d) - 1) if list(d[e - n + 1 : e + 1]) == pat]
        if conts:
            return n, conts
    return 0, []


def random_docs(rng, n_docs=25, vocab=6, max_len=40):
    return [[rng.randrange(vocab) for _ in range(rng.randrange(0, max_len))]
            for _ in range(n_docs)]


def random_context(rng, docs, vocab):
    doc = rng.choice([d for d in docs if d])
    cut = rng.randrange(1, len(doc) + 1)
    noise = [rng.randrange(vocab + 2) for _ in range(rng.randrange(0, 4))]  # some unseen ids
    return noise + doc[max(0, cut - rng.randrange(1, 20)) : cut]


@pytest.mark.parametrize("seed", range(4))
def test_rest_drafts_equal_brute_force(tmp_path, seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 6, 12])
    docs = random_docs(rng, vocab=vocab)
    path = build_rest_index(docs, tmp_path / "idx", vocab_size=vocab + 2, depth=8)
    full = RestDrafter(path, max_suffix=8, min_suffix=rng.choice([1, 2]), choices=10**6)
    top1 = RestDrafter(path, max_suffix=8, min_suffix=full.min_suffix, choices=1)
    if seed % 2:
        full.index.gather_below = 0  # every range narrowed by binary search
    for _ in range(60):
        ctx = random_context(rng, docs, vocab)
        dlen = rng.randrange(1, 7)
        n, conts = brute_rest(docs, ctx, 8, full.min_suffix, dlen)
        got = full.propose(request(ctx, 10**6, dlen))
        assert full.last_match_len == n
        if not conts:
            assert got == []
            continue
        prefix_count = Counter(c[:i] for c in conts for i in range(1, len(c) + 1))
        maximal = {c for c in conts if not any(o != c and o[: len(c)] == c for o in conts)}
        assert {d.tokens for d in got} == maximal
        for d in got:
            assert d.score == pytest.approx(prefix_count[d.tokens] / len(conts))
            assert d.source == "rest"
        assert [d.score for d in got] == sorted((d.score for d in got), reverse=True)
        # The budget: num_drafts and draft_len are respected.
        few = full.propose(request(ctx, 2, dlen))
        assert [d.tokens for d in few] == [d.tokens for d in got[:2]]
        # choices=1 keeps the single most frequent first token.
        (one,) = top1.propose(request(ctx, 10, dlen))
        first = Counter(c[0] for c in conts)
        assert len(one.tokens) == 1 and first[one.tokens[0]] == max(first.values())


def test_continuation_trie_ties():
    """The ``choices`` most frequent prefixes, ties shorter then smaller tokens first; leaves
    by count, then deeper, then tokens; -1 ends a row."""
    cont = np.array([[2, 5, 6], [1, 2, -1], [2, 4, -1], [1, 3, -1], [-1, 7, 7]])
    assert continuation_trie(cont, 1) == [((1,), 2)]
    assert continuation_trie(cont, 3) == [((2,), 2), ((1, 2), 1)]
    assert continuation_trie(cont, 4) == [((2,), 2), ((1, 2), 1), ((1, 3), 1)]
    assert continuation_trie(cont, 7) == continuation_trie(cont, 100) == [
        ((2, 5, 6), 1), ((1, 2), 1), ((1, 3), 1), ((2, 4), 1)]
    assert continuation_trie(cont[4:], 5) == continuation_trie(cont[:0], 5) == []


def test_rest_never_crosses_documents_and_subsamples_occurrences(tmp_path):
    docs = [[1, 2, 3], [4, 5, 6], [2, 3, 9, 9]] + [[7, 8, i] for i in range(10, 30)]
    r = RestDrafter(build_rest_index(docs, tmp_path / "a", 40, depth=4), max_suffix=4)
    # (1, 2, 3) ends its document, so nothing follows it (not doc 2's 4 5 6): the next
    # shorter suffix (2, 3) is followed by 9 9 in doc 3.
    assert [d.tokens for d in r.propose(request([0, 1, 2, 3]))] == [(9, 9)]
    assert r.last_match_len == 2
    assert r.propose(request([4, 5, 6])) == [] and r.last_match_len == 0
    r1 = RestDrafter(tmp_path / "a", max_suffix=4, min_suffix=1)
    assert r1.propose(request([0, 6])) == []  # 6 only ends a document
    assert [d.tokens for d in r1.propose(request([0, 9]))] == [(9,)]
    # 20 occurrences of (7, 8), at most k=5 of them counted.
    rk = RestDrafter(tmp_path / "a", max_suffix=4, k=5)
    got = rk.propose(request([7, 8], 50, 3))
    assert len(got) == 5 and all(d.score == pytest.approx(1 / 5) for d in got)
    assert all(d.tokens[0] in range(10, 30) for d in got)
    with pytest.raises(ValueError, match="sort depth"):
        RestDrafter(tmp_path / "a", max_suffix=16)
    with pytest.raises(ValueError, match="vocabulary"):
        build_rest_index([[1, 50]], tmp_path / "b", 40)
    with pytest.raises(FileNotFoundError):
        RestDrafter(tmp_path / "missing")


def test_draftretriever_drafts_follow_corpus_trigrams(tmp_path):
    rng = random.Random(7)
    docs = random_docs(rng, vocab=8)
    d = DraftRetrieverDrafter(build_draftretriever_index(docs, tmp_path / "dr.idx", 10))
    trigrams = {tuple(doc[i : i + 3]) for doc in docs for i in range(len(doc) - 2)}
    followed = {t[:2] for t in trigrams}
    for _ in range(60):
        ctx = random_context(rng, docs, 8)
        if len(ctx) < 2:
            continue
        got = d.propose(request(ctx, 10, rng.randrange(1, 6)))
        assert bool(got) == (tuple(ctx[-2:]) in followed)
        for x in got:
            w = list(ctx[-2:]) + list(x.tokens)
            assert all(tuple(w[i : i + 3]) in trigrams for i in range(len(w) - 2))
    # Inputs that make the package abort the process are refused before reaching it.
    assert d.propose(request([3])) == []
    assert DraftRetrieverDrafter(tmp_path / "dr.idx", choices=1).choices == 2


# ----------------------------------------------------------------- stores and decoding

PROMPT = "def parse_args(argv):\n    parser = "


@pytest.fixture(scope="module")
def tiny_store(tiny_llama_dir, code_corpus_dir, tmp_path_factory):
    """A store of the tiny llama over a few stdlib snippets and the model's own greedy
    continuation of PROMPT (so retrieval finds drafts while decoding PROMPT)."""
    from dresd.models import load_model
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    model, tok = load_model(tiny_llama_dir)
    ids = tok(PROMPT)["input_ids"]
    own = tok.decode(ids + greedy_reference(model, ids, 40), skip_special_tokens=True)
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "own.txt").write_text(own)
    for p in sorted(code_corpus_dir.iterdir())[:3]:
        (corpus / (p.name + ".txt")).write_text(p.read_text()[:3000])
    path = tmp_path_factory.mktemp("store") / "s"
    build_store(corpus, path, BuildConfig(model=str(tiny_llama_dir), dim=8, value_len=8,
                                          sample_size=500, shard_tokens=1500, progress=False))
    return path


def test_from_store_indexes_exactly_the_store_documents(tiny_store, tmp_path, monkeypatch):
    from dresd.store import load_store

    store = load_store(tiny_store, verify=False)
    assert len(store.shards) >= 2
    expected = [-1]
    for shard in store.shards:
        for s, e in zip(shard.doc_starts, shard.doc_ends):
            expected += shard.tokens[s:e].tolist() + [-1]
    r = RestDrafter.from_store(store, cache_dir=tmp_path)
    assert r.index.tokens.tolist() == expected
    assert r.index.meta["num_docs"] == store.manifest.num_docs
    assert r.index.meta["num_tokens"] == store.manifest.num_tokens
    built = r.index.path.stat().st_mtime_ns
    assert RestDrafter.from_store(store, cache_dir=tmp_path).index.path.stat().st_mtime_ns == built
    # DRESD_CACHE is the default cache root.
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "env"))
    r_env = RestDrafter.from_store(store)
    assert r_env.index.path.parent == tmp_path / "env" / "rest"
    dr = DraftRetrieverDrafter.from_store(store)
    # A context taken from inside a document drafts its own continuation.
    doc = store.shards[0].tokens[store.shards[0].doc_starts[0]:].tolist()[:40]
    n, _ = brute_rest([expected], doc[:20], 16, 2, 5)
    assert n > 0 and tuple(doc[20:25]) in {d.tokens for d in r.propose(request(doc[:20], 64, 5))}
    assert dr.propose(request(doc[:20], 64, 5))


def test_lossless_greedy_with_each_baseline(tiny_llama_dir, tiny_store, tmp_path):
    from dresd.models import load_model
    from dresd.store import load_store

    model, tok = load_model(tiny_llama_dir)
    ref = greedy_reference(model, tok(PROMPT)["input_ids"], 30)
    store = load_store(tiny_store, verify=False)
    for drafter in (PromptLookupDrafter(),
                    RestDrafter.from_store(store, cache_dir=tmp_path),
                    DraftRetrieverDrafter.from_store(store, cache_dir=tmp_path)):
        res = generate(model, tok, drafter, PROMPT, max_new_tokens=30, num_drafts=4, draft_len=6)
        assert res.tokens == ref, drafter.name
        if drafter.name != "prompt_lookup":
            assert res.stats.accepted_tokens > 0, drafter.name


def test_repetitive_prompt_accepts_prompt_lookup_and_in_domain_rest(tiny_llama_dir, tmp_path):
    from dresd.models import load_model

    model, tok = load_model(tiny_llama_dir)
    prompt = "for i in range(10):\n    print(i)\n" * 6 + "for i in range(10):\n"
    ids = tok(prompt)["input_ids"]
    ref = greedy_reference(model, ids, 40)
    pl = generate(model, tok, PromptLookupDrafter(), prompt, max_new_tokens=40, num_drafts=4,
                  draft_len=6)
    assert pl.tokens == ref
    assert pl.stats.accepted_length > 1
    # REST over the model's own output (an in-domain corpus) accepts drafts too.
    own = build_rest_index([ids + ref], tmp_path / "own", len(tok))
    rest = generate(model, tok, RestDrafter(own), prompt, max_new_tokens=40, num_drafts=4,
                    draft_len=6)
    assert rest.tokens == ref
    assert rest.stats.accepted_length > 1


# ------------------------------------------------------------------------------ SuffixDecoding


def brute_suffix(seqs, ctx, max_depth, factor, min_prob):
    """SuffixDecoding's tree draft by full scans: for each match length m (1..len(ctx)-1) the
    nodes are the continuations Q of the context's last m tokens with
    p(Q) = occ(match + Q) / occ(match) >= min_prob, |match + Q| <= max_depth, at most
    m * factor of them, best p first; the draft is the match whose p sum is largest (the longer
    on a tie). Returns {path: p} and the match length."""

    def occ(pat):
        return sum(1 for s in seqs for i in range(len(s) - len(pat) + 1)
                   if s[i:i + len(pat)] == list(pat))

    best, best_score, best_m = {}, 0.0, 0
    for m in range(1, len(ctx)):
        match = tuple(ctx[len(ctx) - m:])
        base = occ(match)
        if not base:
            break
        nodes, frontier = {}, [()]
        while frontier:
            q = frontier.pop()
            if len(match) + len(q) >= max_depth:
                continue
            for t in {s[i + len(match) + len(q)] for s in seqs
                      for i in range(len(s) - len(match) - len(q))
                      if s[i:i + len(match) + len(q)] == list(match + q)}:
                p = occ(match + q + (t,)) / base
                if p >= min_prob:
                    nodes[q + (t,)] = p
                    frontier.append(q + (t,))
        limit = int(m * factor + 1e-6)
        kept = dict(sorted(nodes.items(), key=lambda kv: -kv[1])[:limit])
        score = sum(kept.values())
        if score >= best_score - 1e-5:
            best, best_score, best_m = kept, score, m
    return best, best_m


def tree_paths(tree):
    paths = {0: ()}
    for i in range(1, len(tree)):
        paths[i] = paths[tree.parents[i]] + (tree.tokens[i],)
    return set(paths.values()) - {()}


@pytest.mark.parametrize("seed", range(6))
def test_suffix_drafter_tree_equals_brute_force(seed):
    """The global tree (the store's documents), the local one (prompt and output) and the
    wrapper's DraftTree against full scans (the factor and node limit are large, so every node
    above the probability floor is drafted and ties cannot decide which are kept)."""
    from dresd.drafters.suffix import SuffixDrafter, tree_of
    from dresd.tree import TreeBudget

    rng = random.Random(seed)
    docs = random_docs(rng, n_docs=8, vocab=4, max_len=30)
    prompt = random_context(rng, docs, 4)
    d = SuffixDrafter(tree_of(docs, 12), max_depth=12, max_spec_factor=50.0,
                      min_token_prob=0.29)
    d.begin(prompt[:-1], None)
    for local in (False, True):  # the store's tree alone, then with the prompt's tree too
        if not local:
            d.local_tree = d.module.SuffixTree(12)
        else:
            d.begin(prompt[:-1], None)
        tree = d.propose_tree(request(prompt), TreeBudget(max_tree_tokens=1000), vocab_size=4)
        # the local tree's draft wins a tie, as in Arctic Inference's cache
        cands = ([brute_suffix([prompt[:-1]], prompt[-12:], 12, 50.0, 0.29)] if local else [])
        cands.append(brute_suffix(docs, prompt[-12:], 12, 50.0, 0.29))
        want = max(cands, key=lambda c: sum(c[0].values()))[0]
        assert tree_paths(tree) == set(want)
        # the composite's view: the leaves of that tree, scored by their probability
        leaves = d.propose(request(prompt, num_drafts=100, draft_len=100))
        assert {x.tokens: x.score for x in leaves} == pytest.approx(
            {q: p for q, p in want.items() if not any(len(r) > len(q) and r[:len(q)] == q
                                                      for r in want)})
        assert all(x.source == "suffix" and 0 < x.score <= 1 for x in leaves)


def test_suffix_drafter_respects_the_budget_and_follows_the_output():
    from dresd.drafters.suffix import SuffixDrafter
    from dresd.tree import TreeBudget

    d = SuffixDrafter()  # no store: the prompt and output alone
    seq = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    d.begin(seq[:-1], None)
    tree = d.propose_tree(request(seq), TreeBudget(max_tree_tokens=4))
    assert len(tree) == 4 and tree.tokens[1:] == [7, 8, 9]
    # committed tokens extend the request's tree: 1 2 3 after 6 becomes the likelier path
    d.accept([6, 1, 2, 3, 5, 6, 1, 2, 3, 5], None)
    tree = d.propose_tree(request(seq + [1, 2, 3, 5, 6, 1, 2, 3, 5, 6]), TreeBudget())
    assert tree.tokens[1:4] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="before begin"):
        SuffixDrafter().propose(request(seq))


def test_lossless_greedy_with_suffix_decoding(tiny_llama_dir, tiny_store):
    """SuffixDecoding alone under fixed budgets, and beside the hybrid's sources under the
    calibrated budget: every output equals greedy decoding, and the store's tree is used."""
    from dresd.decode import DecodeConfig
    from dresd.drafters.suffix import SuffixDrafter
    from dresd.models import load_model
    from dresd.store import load_store

    model, tok = load_model(tiny_llama_dir)
    ref = greedy_reference(model, tok(PROMPT)["input_ids"], 30)
    store = load_store(tiny_store, verify=False)
    for budget in (dict(num_drafts=1, draft_len=7, max_tree_tokens=8),
                   dict(num_drafts=4, draft_len=8, max_tree_tokens=16)):
        res = generate(model, tok, SuffixDrafter.from_store(store), PROMPT, max_new_tokens=30,
                       **budget)
        assert res.tokens == ref
        assert res.stats.accepted_tokens > 0
    for drafter in ("suffix", "dense,context,prompt_lookup,suffix"):
        config = DecodeConfig(max_new_tokens=30, drafter=drafter, budget="calibrated")
        assert generate(model, tok, store, PROMPT, config).tokens == ref, drafter
