"""The drafter a ``generate`` call decodes with: a Drafter as given, or the sources a
``DecodeConfig`` names, built from the registry (dresd.drafters.registry) and, unless one source
under a fixed budget is all it names, merged by a CompositeDrafter under the config's budget.

A composite built here keeps its acceptance estimates to itself (it carries them from one
generation to the next when it is reused) unless the caller hands it a ``memory`` to share.
"""

from __future__ import annotations

from dresd.budget import FixedBudget, calibrated_budget
from dresd.decode_config import DecodeConfig
from dresd.drafters import registry
from dresd.drafters.base import Drafter
from dresd.drafters.composite import CompositeDrafter
from dresd.store import Store


def as_drafter(source, config: DecodeConfig, model=None, tokenizer=None,
               memory: dict | None = None) -> Drafter:
    """A Drafter as is. A Store (checked against the model), or None, becomes the sources
    ``config.drafter`` names: one source under a fixed budget is returned alone, anything else
    is a CompositeDrafter under ``config.budget`` (the calibrated budget needs ``model``).

    ``memory``: the composite's store of acceptance estimates (``CompositeDrafter(memory=)``),
    for a caller that wants composites to share them, e.g. one per model, store and config
    across requests; it should only be shared by composites of the same model, store, sources
    and settings, since any of them changes what is accepted. None: the composite's own."""
    if isinstance(source, Drafter):
        return source
    if source is not None and not isinstance(source, Store):
        raise TypeError(f"expected a Drafter or a Store (or None), got {type(source).__name__}")
    store = source
    if store is not None and model is not None and tokenizer is not None:
        store.check_model(model, tokenizer)
    names = registry.drafter_names(config.drafter, has_store=store is not None)
    sources = [registry.DRAFTERS[name].build(store, config) for name in names]
    if config.budget == "fixed" and len(sources) == 1:
        return sources[0]
    if config.budget == "fixed":
        policy = FixedBudget(config.max_tree_tokens)
    else:
        if model is None:
            raise ValueError("the calibrated budget needs the model (its verify cost is "
                             "measured on its device)")
        fingerprint = store.manifest.model.fingerprint if store is not None else None
        policy = calibrated_budget(model, tokenizer, fingerprint, config.max_tree_tokens)
    return CompositeDrafter(sources, policy, memory=memory)
