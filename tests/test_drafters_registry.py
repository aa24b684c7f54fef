"""The drafter registry: names, the 'hybrid' expansion, building, a new source in one line, and
the score contract."""

import math

import pytest
import torch
from tiny_models import greedy_reference, make_tiny_model

from dresd.decode import DecodeConfig, as_drafter, generate
from dresd.drafters import registry
from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.composite import CompositeDrafter


class RepeatDrafter(Drafter):
    """Drafts the last token of the sequence again: a source defined outside dresd."""

    name = "repeat"

    @classmethod
    def from_config(cls, store, config):
        return cls()

    def propose(self, request: DraftRequest) -> list[Draft]:
        return [Draft((int(request.tokens[-1]),) * request.draft_len, 0.5, self.name)]


@pytest.fixture
def with_repeat(monkeypatch):
    monkeypatch.setattr(registry, "DRAFTERS", dict(registry.DRAFTERS))
    return registry.register("repeat", f"{__name__}:RepeatDrafter", "always 0.5",
                             help="the last token again")


def test_names_and_hybrid_come_from_the_registry():
    assert registry.DRAFTER_NAMES == ("dense", "context", "prompt_lookup", "rest", "suffix")
    assert registry.hybrid_names(True) == ["dense", "context", "prompt_lookup"]
    assert registry.hybrid_names(False) == ["context", "prompt_lookup"]
    assert registry.drafter_names("hybrid", has_store=False) == ["context", "prompt_lookup"]
    for spec in registry.DRAFTERS.values():
        assert spec.score and spec.help
        assert spec.name in DecodeConfig.__dataclass_fields__["drafter"].metadata["help"]
    with pytest.raises(ValueError, match="distinct names"):
        registry.drafter_names("context,context", has_store=False)
    with pytest.raises(ValueError, match="taken"):
        registry.register("dense", "x:y", "")


def test_store_free_sources_build_and_store_sources_refuse_without_a_store():
    config = DecodeConfig(drafter="context,prompt_lookup", budget="fixed", k=3)
    comp = as_drafter(None, config)
    assert isinstance(comp, CompositeDrafter)
    assert [d.name for d in comp.drafters] == ["context", "prompt_lookup"]
    assert comp.drafters[0].k == 3
    for name in ("dense", "rest", "suffix"):
        with pytest.raises(ValueError, match="needs a store"):
            as_drafter(None, DecodeConfig(drafter=name, budget="fixed"))


def test_composites_share_estimates_only_through_a_memory_passed_in():
    config = DecodeConfig(drafter="context,prompt_lookup", budget="fixed")
    assert as_drafter(None, config).memory is not as_drafter(None, config).memory
    shared: dict = {}
    first, second = (as_drafter(None, config, memory=shared) for _ in range(2))
    assert first.memory is second.memory is shared and shared["stats"] is second.stats


def test_a_new_source_is_one_registry_line(with_repeat):
    model, tok = make_tiny_model("llama")
    ids = tok("def parse_args(argv):\n    parser = ")["input_ids"]
    out = generate(model, tok, None, ids, max_new_tokens=12, drafter="repeat", budget="fixed")
    assert out.tokens == greedy_reference(model, ids, 12)
    assert out.stats.steps >= 1
    mixed = as_drafter(None, DecodeConfig(drafter="repeat,prompt_lookup", budget="fixed"))
    assert mixed.names == ["repeat", "prompt_lookup"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", None])
def test_a_draft_score_must_be_a_finite_number(bad):
    with pytest.raises(ValueError, match="finite"):
        Draft((1, 2), bad, "s")


def test_store_free_scores_are_on_the_shared_scale():
    lo, hi = registry.SCORE_RANGE
    gen = torch.Generator().manual_seed(0)
    seq = [int(t) for t in torch.randint(0, 5, (60,), generator=gen)]
    hidden = torch.randn(len(seq), 16, generator=gen)
    config = DecodeConfig(budget="fixed")
    for name in registry.hybrid_names(False):
        d = registry.DRAFTERS[name].build(None, config)
        d.begin(seq[:-1], hidden[:-1])
        drafts = d.propose(DraftRequest(seq, hidden[-1], 10, 5))
        assert drafts, name
        assert all(lo - 1e-5 <= x.score <= hi + 1e-5 for x in drafts), name
