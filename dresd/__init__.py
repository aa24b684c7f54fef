"""dresd: dense-retrieval speculative decoding.

Public API::

    store = dresd.load_store(path, model, tokenizer)
    result = dresd.generate(model, tokenizer, store, "prompt", max_new_tokens=128)
    result.text, result.tokens, result.stats
    table = dresd.open_archive(path)  # the store's float16 keys as a LanceDB table

By default ``generate`` drafts with the hybrid composite (the store's dense drafts, dense drafts
over the live context and prompt lookup in one tree) under the budget calibrated for the model on
its device; ``drafter=`` and ``budget=`` (DecodeConfig fields) select other sources and the
fixed budget, and any Drafter (e.g. a CompositeDrafter built by hand) can be passed instead.

Errors: ``StoreFormatError`` (the store on disk is not what this code reads), ``StorageError``
(object storage cannot be reached or used), ``StoreMismatchError`` (another model's store),
``ValueError``/``TypeError`` naming the argument for bad arguments.
"""

from dresd.archive import open_archive
from dresd.budget import BudgetPolicy, CalibratedBudget, FixedBudget, calibrated_budget
from dresd.calibrate import Calibration
from dresd.decode import DecodeConfig, GenerationResult, GenerationStats, as_drafter, generate
from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.composite import CompositeDrafter
from dresd.drafters.context import ContextDrafter
from dresd.drafters.dense import StoreDrafter
from dresd.drafters.prompt_lookup import PromptLookupDrafter
from dresd.drafters.rest import RestDrafter
from dresd.store import Store, StoreMismatchError, load_store
from schemas.errors import StorageError, StoreFormatError

__all__ = [
    "BudgetPolicy",
    "CalibratedBudget",
    "Calibration",
    "CompositeDrafter",
    "ContextDrafter",
    "DecodeConfig",
    "Draft",
    "DraftRequest",
    "Drafter",
    "FixedBudget",
    "GenerationResult",
    "GenerationStats",
    "PromptLookupDrafter",
    "RestDrafter",
    "Store",
    "StorageError",
    "StoreDrafter",
    "StoreFormatError",
    "StoreMismatchError",
    "as_drafter",
    "calibrated_budget",
    "generate",
    "load_store",
    "open_archive",
]
