"""dresd: dense-retrieval speculative decoding.

Public API::

    store = dresd.load_store(path, model, tokenizer)
    result = dresd.generate(model, tokenizer, store, "prompt", max_new_tokens=128)
    result.text, result.tokens, result.stats
"""

from dresd.decode import DecodeConfig, GenerationResult, GenerationStats, generate
from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.dense import StoreDrafter
from dresd.store import Store, StoreMismatchError, load_store

__all__ = [
    "DecodeConfig",
    "Draft",
    "DraftRequest",
    "Drafter",
    "GenerationResult",
    "GenerationStats",
    "Store",
    "StoreDrafter",
    "StoreMismatchError",
    "generate",
    "load_store",
]
