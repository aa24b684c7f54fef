"""The one interface every drafter implements (cf. transformers' CandidateGenerator).

The decoder drives a drafter through one generation:

1. ``begin(prompt_tokens, prompt_hidden)`` once the prompt is prefilled;
2. each step, ``propose_tree(request, budget)`` with the token ``y`` the model has just decided
   (not yet in the KV cache) and the hidden state that predicted it; the drafter returns the
   tree of continuations that would follow ``y`` (by default its ``propose`` drafts merged);
3. ``accept(tokens, hidden)`` with the tokens committed to the cache this step (``y`` and the
   accepted draft tokens, in order) and their final hidden states;
4. ``verified(tree_tokens, seconds)``: what that step's verify pass cost (optional).

Hidden states are final-layer states (after the final norm), one row per token position; the row
for token t is the state from which the model predicted token t + 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dresd.draft import Draft
from dresd.tree import DraftTree

__all__ = ["Draft", "DraftRequest", "Drafter"]  # Draft is dresd.draft's, kept importable here


@dataclass(frozen=True)
class DraftRequest:
    tokens: Sequence[int]  # prompt + committed tokens + y (last)
    hidden: torch.Tensor  # [H] the state that predicted y
    num_drafts: int
    draft_len: int


class Drafter(ABC):
    """A source of drafts. One that ``DecodeConfig.drafter`` can name is registered in
    dresd.drafters.registry and builds itself with ``from_config(store, config)``."""

    name: str = "drafter"

    def begin(self, prompt_tokens: Sequence[int], prompt_hidden: torch.Tensor) -> None:
        """A new generation starts; ``prompt_hidden`` is [len(prompt_tokens), H]."""

    @abstractmethod
    def propose(self, request: DraftRequest) -> list[Draft]:
        """Up to ``num_drafts`` continuations of at most ``draft_len`` tokens after ``y``."""

    def propose_tree(self, request: DraftRequest, budget, vocab_size: int | None = None):
        """The tree the decoder verifies for this step: a ``dresd.tree.DraftTree`` rooted at
        ``y`` within ``budget`` (a TreeBudget). By default this step's drafts merged best score
        first; a drafter that plans a tree itself returns it here."""
        return DraftTree.build(request.tokens[-1], self.propose(request), budget, vocab_size)

    def accept(self, tokens: Sequence[int], hidden: torch.Tensor) -> None:
        """Tokens committed this step (y first) and their hidden states [len(tokens), H]."""

    def verified(self, tree_tokens: int, seconds: float) -> None:
        """The wall time the decoder measured for this step's verify pass over ``tree_tokens``
        tokens (root included); drafters that size their trees to the device learn from it."""
