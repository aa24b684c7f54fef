"""Which drafter a generation uses: a Drafter as is, or the sources a DecodeConfig names."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from dresd.drafters.base import Drafter

if TYPE_CHECKING:
    from dresd.decode import DecodeConfig

DRAFTER_NAMES = ("dense", "context", "prompt_lookup", "rest")


def drafter_names(spec: str, has_store: bool) -> list[str]:
    """The sources named by ``DecodeConfig.drafter``: 'hybrid' or a comma-separated list."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["hybrid"]:
        return ["dense", "context", "prompt_lookup"] if has_store else ["context", "prompt_lookup"]
    bad = [n for n in names if n not in DRAFTER_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"drafter must be 'hybrid' or distinct names among {DRAFTER_NAMES}, "
                         f"not {spec!r}")
    return names


def as_drafter(source, config: DecodeConfig, model=None, tokenizer=None) -> Drafter:
    """A Drafter as is. A Store (checked against the model), or None, becomes the sources
    ``config.drafter`` names: one source under a fixed budget is returned alone, anything else
    is a CompositeDrafter under ``config.budget`` (the calibrated budget needs ``model``)."""
    if isinstance(source, Drafter):
        return source
    from dresd.store import Store

    if source is not None and not isinstance(source, Store):
        raise TypeError(f"expected a Drafter or a Store (or None), got {type(source).__name__}")
    store = source
    if store is not None and model is not None and tokenizer is not None:
        store.check_model(model, tokenizer)
    names = drafter_names(config.drafter, has_store=store is not None)
    sources = [_make_source(name, store, config) for name in names]
    if config.budget == "fixed" and len(sources) == 1:
        return sources[0]
    from dresd.budget import FixedBudget, calibrated_budget
    from dresd.drafters.composite import CompositeDrafter

    if config.budget == "fixed":
        policy = FixedBudget(config.max_tree_tokens)
    else:
        if model is None:
            raise ValueError("the calibrated budget needs the model (its verify cost is "
                             "measured on its device)")
        fingerprint = store.manifest.model.fingerprint if store is not None else None
        policy = calibrated_budget(model, tokenizer, fingerprint, config.max_tree_tokens)
    return CompositeDrafter(sources, policy, memory=_acceptance_memory(model, store, config))


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _acceptance_memory(model, store, config: DecodeConfig) -> dict | None:
    """Where a composite keeps its acceptance estimates between generate calls: one dict per
    model object, store and drafting configuration (None without the model)."""
    if model is None:
        return None
    key = (str(store.path) if store is not None else "",
           store.manifest.generation if store is not None else 0,
           config.drafter, config.budget, config.num_drafts, config.draft_len,
           config.max_tree_tokens, config.k, config.nprobe)
    return _MEMORIES.setdefault(model, {}).setdefault(key, {})


def _make_source(name: str, store, config: DecodeConfig) -> Drafter:
    if name in ("dense", "rest") and store is None:
        raise ValueError(f"the {name} drafter needs a store")
    if name == "dense":
        from dresd.drafters.dense import StoreDrafter

        return StoreDrafter(store, k=config.k, nprobe=config.nprobe)
    if name == "context":
        from dresd.drafters.context import ContextDrafter

        return ContextDrafter(store.transform if store is not None else None, k=config.k)
    if name == "prompt_lookup":
        from dresd.drafters.prompt_lookup import PromptLookupDrafter

        return PromptLookupDrafter()
    from dresd.drafters.rest import RestDrafter

    return RestDrafter.from_store(store)
