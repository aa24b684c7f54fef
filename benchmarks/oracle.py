"""Drafters that know the answer: the model's own greedy output for the prompt.

``OracleDrafter`` is the ceiling: its first draft is always that continuation, so every draft
token of it is accepted and decoding with it shows the best speedup any drafter could reach at
the same budget. The other drafts fill the tree with branches that diverge at their first token,
so each verify pass costs what a full tree of that budget costs. ``SelectionOracle`` knows the
answer only for choosing among the default composite's own candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from dresd.drafters.base import Draft, Drafter, DraftRequest


def continuation(reference: Sequence[int], prompt_len: int, request: DraftRequest) -> tuple:
    """The next ``request.draft_len`` tokens of the greedy output after ``y``: request.tokens
    ends with y, the token at generated index len - prompt_len - 1."""
    i = len(request.tokens) - prompt_len
    return tuple(reference[i : i + request.draft_len])


class OracleDrafter(Drafter):
    name = "oracle"

    def __init__(self, prompt_len: int, reference: Sequence[int], vocab_size: int):
        self.prompt_len = prompt_len
        self.reference = list(reference)  # greedy autoregressive output for this prompt
        self.vocab_size = vocab_size

    def propose(self, request: DraftRequest) -> list[Draft]:
        truth = continuation(self.reference, self.prompt_len, request)
        if not truth:
            return []
        drafts = [Draft(truth, 1.0, self.name)]
        for j in range(1, request.num_drafts):
            wrong = (truth[0] + j) % self.vocab_size  # differs from the truth at depth 1
            drafts.append(Draft((wrong,) + truth[1:], 0.0, self.name))
        return drafts


class SelectionOracle(Drafter):
    """The default's own candidates, chosen with the answer known: each step the composite
    proposes as usual (its sources, its candidate trie, its estimates, which go on learning),
    and the tree verified is only the deepest candidate path the model's greedy continuation
    follows (the root alone when no candidate has its next token).

    No selection policy or budget can do better with these candidates, so this splits the
    distance to the ceiling: from the oracle to this is drafting loss (no source had the
    tokens), from the composite to this is selection loss (a source had them, the tree did not
    take them, or took them at a cost)."""

    name = "selection_oracle"

    def __init__(self, composite, prompt_len: int, reference: Sequence[int]):
        self.composite = composite
        self.prompt_len = prompt_len
        self.reference = list(reference)

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self.composite.begin(prompt_tokens, prompt_hidden)

    def propose(self, request: DraftRequest) -> list[Draft]:
        self.composite.propose(request)
        path = self._right_path(request)
        return [Draft(path, 1.0, self.name)] if path else []

    def propose_tree(self, request: DraftRequest, budget, vocab_size: int | None = None):
        from dresd.tree import DraftTree

        self.composite.propose_tree(request, budget, vocab_size)
        path = self._right_path(request)
        return DraftTree.from_paths(request.tokens[-1], [(path, self.name)] if path else [],
                                    budget, vocab_size)

    def _right_path(self, request: DraftRequest) -> tuple:
        """The deepest of the open step's candidate paths the greedy output follows."""
        truth = continuation(self.reference, self.prompt_len, request)
        paths = self.composite.open_candidates() or ()
        return max((p for p in paths if p == truth[: len(p)]), key=len, default=())

    def accept(self, tokens, hidden) -> None:
        self.composite.accept(tokens, hidden)

    def verified(self, tree_tokens: int, seconds: float) -> None:
        self.composite.verified(tree_tokens, seconds)
