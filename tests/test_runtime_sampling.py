"""Speculative sampling is lossless: the token distribution matches plain sampling."""

from collections import Counter

import pytest
import torch

import dresd.decode
from dresd.decode import generate
from dresd.drafters.base import Draft, Drafter
from dresd.sampling import SamplingParams, target_probs, warp_logits

PARAMS = SamplingParams(temperature=1.5, top_k=4, top_p=0.97)
TRIALS = 3000


def test_warping_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for params in [SamplingParams(0.7, 5, 0.9), SamplingParams(1.3, 0, 0.5),
                   SamplingParams(1.0, 3, 1.0), SamplingParams(2.0, 0, 1.0)]:
        ref = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
        if params.top_k:
            ref = TopKLogitsWarper(params.top_k)(None, ref)
        if params.top_p < 1:
            ref = TopPLogitsWarper(params.top_p)(None, ref)
        torch.testing.assert_close(warp_logits(logits, params), ref)


@torch.no_grad()
def exact_distribution(model, prompt: list[int], depth: int) -> dict[tuple, float]:
    """P(first ``depth`` tokens) under plain sampling with PARAMS, by enumeration."""
    dist = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for prefix, p in dist.items():
            probs = target_probs(model(torch.tensor([prompt + list(prefix)])).logits[0, -1], PARAMS)
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (t,)] = p * float(probs[t])
        dist = nxt
    return dist


class TableDrafter(Drafter):
    """Fixed drafts per decided token: a less likely child first, the likeliest with a
    continuation second, and a token plain sampling never picks third."""

    def __init__(self, model, prompt):
        self.model, self.prompt, self.table = model, prompt, {}

    @torch.no_grad()
    def propose(self, request):
        key = tuple(request.tokens)
        if key not in self.table:
            probs = target_probs(self.model(torch.tensor([list(key)])).logits[0, -1], PARAMS)
            order = torch.argsort(probs, descending=True).tolist()
            best = order[0]
            after = target_probs(self.model(torch.tensor([list(key) + [best]])).logits[0, -1],
                                 PARAMS).argmax().item()
            self.table[key] = [
                Draft((order[1],), 0.9),
                Draft((best, after), 0.8),
                Draft((order[-1],), 0.7),  # outside top-k: probability 0
            ]
        return self.table[key]


def chi_square_pvalue(counts: Counter, exact: dict, n: int) -> float:
    """Pearson chi-square over the exact outcomes, cells with expected < 5 pooled."""
    assert set(counts) <= set(exact), f"impossible outcomes sampled: {set(counts) - set(exact)}"
    stat, df = 0.0, -1
    pool_e = pool_o = 0.0
    for outcome, p in exact.items():
        e, o = p * n, counts.get(outcome, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        df += 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def sample_outcomes(model, tok, prompt, depth: int) -> tuple[Counter, int]:
    """Outcome counts over TRIALS generations, and how many draft tokens were accepted."""
    drafter = TableDrafter(model, prompt)
    counts = Counter()
    accepted = 0
    for seed in range(TRIALS):
        res = generate(model, tok, drafter, prompt, max_new_tokens=depth, seed=seed,
                       temperature=PARAMS.temperature, top_k=PARAMS.top_k, top_p=PARAMS.top_p)
        counts[tuple(res.tokens)] += 1
        accepted += res.stats.accepted_tokens
    return counts, accepted


@pytest.fixture(scope="module")
def gpt2_setup():
    from tiny_models import make_tiny_model

    model, tok = make_tiny_model("gpt2")
    prompt = tok("import os\nimport ")["input_ids"]
    model.generation_config.eos_token_id = None  # sequences of exactly three tokens
    return model, tok, prompt, exact_distribution(model, prompt, 3)


def test_speculative_sampling_matches_plain_sampling(gpt2_setup):
    model, tok, prompt, exact = gpt2_setup
    assert len(exact) >= 8 and max(exact.values()) < 0.9  # a distribution worth testing
    counts, accepted = sample_outcomes(model, tok, prompt, 3)
    assert accepted > TRIALS // 2  # drafts were accepted often, so acceptance was exercised
    assert chi_square_pvalue(counts, exact, TRIALS) > 1e-3
    tv = 0.5 * sum(abs(counts.get(o, 0) / TRIALS - p) for o, p in exact.items())
    assert tv < 0.05


def test_the_test_detects_a_biased_acceptance_rule(gpt2_setup, monkeypatch):
    """A classic bug: after rejecting a child, sample from p instead of the residual. The
    statistical test above must reject it, or it proves nothing."""
    model, tok, prompt, exact = gpt2_setup

    def biased(probs, children, generator):
        for c in children:
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < float(probs[c]):
                return int(c), True
        return int(torch.multinomial(probs.double().cpu(), 1, generator=generator)), False

    monkeypatch.setattr(dresd.decode, "accept_among_children", biased)
    counts, _ = sample_outcomes(model, tok, prompt, 3)
    assert chi_square_pvalue(counts, exact, TRIALS) < 1e-6


def test_exact_distribution_sums_to_one(gpt2_setup):
    *_, exact = gpt2_setup
    assert abs(sum(exact.values()) - 1) < 1e-5
    assert all(len(k) == 3 for k in exact) and len({k[0] for k in exact}) > 1
