"""The drafter registry: every named draft source, how it is built, and what its scores mean.

``DecodeConfig.drafter`` names sources from ``DRAFTERS``; the CLI's help, the 'hybrid'
expansion, the drafter assembly (dresd.drafters.assemble) and the decode benchmark all read this
table, so a new source is one module (a ``Drafter`` subclass with a ``from_config`` classmethod)
plus one ``register`` line below. The table imports no config and no decoder: they read it.

Score contract (``Draft.score``, enforced finite by ``Draft``): within a source, higher means
likelier to be accepted; across sources, scores share one scale on which 1 means "as sure as
this source gets" and values lie in about [-1, 1] (a dense source's PQ-approximate cosine may
stray slightly past 1). The composite files each source's steps by its best draft's score into
bands with edges 0.6, 0.75 and 0.9 (``CompositeDrafter.score_bands``), so a source whose scores
used another scale (raw counts, log-probabilities) would land in one band and lose that signal.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dresd.drafters.base import Drafter

SCORE_RANGE = (-1.0, 1.0)  # the nominal scale of Draft.score (see the module docstring)


@dataclass(frozen=True)
class DrafterSpec:
    name: str  # its name in DecodeConfig.drafter (and the benchmark's method name)
    target: str  # "module:Class"; the class builds itself with from_config(store, config)
    score: str  # what Draft.score is for this source, on the common scale
    needs_store: bool = False
    hybrid: bool = False  # one of the sources 'hybrid' stands for (when it has what it needs)
    reads: tuple[str, ...] = ()  # DecodeConfig fields from_config reads besides the budget
    help: str = ""  # one line for the CLI's help and the README's table

    def build(self, store, config) -> Drafter:
        """The source, built by its class's ``from_config(store, config)`` (``config``: a
        dresd.decode_config.DecodeConfig)."""
        if self.needs_store and store is None:
            raise ValueError(f"the {self.name} drafter needs a store")
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls).from_config(store, config)


DRAFTERS: dict[str, DrafterSpec] = {}


def register(name: str, target: str, score: str, **kw) -> DrafterSpec:
    if name in DRAFTERS or name == "hybrid" or not name.isidentifier():
        raise ValueError(f"drafter name {name!r} is taken or not an identifier")
    DRAFTERS[name] = spec = DrafterSpec(name, target, score, **kw)
    return spec


# Order matters: 'hybrid' lists its sources in this order, and a composite's memory of
# estimates is only taken over by a composite of the same sources' names in the same order.
register("dense", "dresd.drafters.dense:StoreDrafter", "cosine of the query and the key "
         "(PQ-approximate)", needs_store=True, hybrid=True, reads=("k", "nprobe"),
         help="the store's nearest keys followed by y, and the text after them")
register("context", "dresd.drafters.context:ContextDrafter", "cosine of the query and the key",
         hybrid=True, reads=("k",),
         help="the same dense search over this generation's own hidden states")
register("prompt_lookup", "dresd.drafters.prompt_lookup:PromptLookupDrafter",
         "(n - 1 + 1 / (rank + 1)) / max_ngram: match length, then recency", hybrid=True,
         help="n-gram matches in the prompt and output")
register("rest", "dresd.drafters.rest:RestDrafter", "share of the suffix's occurrences "
         "through the draft's leaf", needs_store=True,
         help="REST: longest context suffix in a suffix array over the store's corpus")
register("suffix", "dresd.drafters.suffix:SuffixDrafter", "estimated probability of the "
         "draft's last token (SuffixDecoding's path frequency, in (0, 1])", needs_store=True,
         help="SuffixDecoding: suffix trees over the store's documents and over the prompt and "
              "output (Arctic Inference's tree, built by benchmarks/build_suffix_tree.py)")

DRAFTER_NAMES = tuple(DRAFTERS)


def hybrid_names(has_store: bool) -> list[str]:
    """The sources 'hybrid' stands for: every hybrid source that has what it needs."""
    return [s.name for s in DRAFTERS.values() if s.hybrid and (has_store or not s.needs_store)]


def drafter_names(spec: str, has_store: bool) -> list[str]:
    """The sources named by ``DecodeConfig.drafter``: 'hybrid' or a comma-separated list."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["hybrid"]:
        return hybrid_names(has_store)
    bad = [n for n in names if n not in DRAFTERS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"drafter must be 'hybrid' or distinct names among {DRAFTER_NAMES}, "
                         f"not {spec!r}")
    return names


def drafter_help() -> str:
    """The sources, one clause each, for command-line help."""
    return "; ".join(f"{s.name}: {s.help}" + (" (needs a store)" if s.needs_store else "")
                     for s in DRAFTERS.values())
