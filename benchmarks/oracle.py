"""The ceiling: a drafter whose first draft is always the model's own greedy continuation.

Every draft token of that draft is accepted, so decoding with it shows the best speedup any
drafter could reach at the same budget. The other drafts fill the tree with branches that diverge
at their first token, so each verify pass costs what a full tree of that budget costs.
"""

from __future__ import annotations

from collections.abc import Sequence

from dresd.drafters.base import Draft, Drafter, DraftRequest


class OracleDrafter(Drafter):
    name = "oracle"

    def __init__(self, prompt_len: int, reference: Sequence[int], vocab_size: int):
        self.prompt_len = prompt_len
        self.reference = list(reference)  # greedy autoregressive output for this prompt
        self.vocab_size = vocab_size

    def propose(self, request: DraftRequest) -> list[Draft]:
        # request.tokens ends with y, the token at generated index i = len - prompt_len - 1
        i = len(request.tokens) - self.prompt_len
        truth = tuple(self.reference[i : i + request.draft_len])
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

    def _truth(self, request: DraftRequest) -> tuple[int, ...]:
        i = len(request.tokens) - self.prompt_len  # as OracleDrafter
        return tuple(self.reference[i : i + request.draft_len])

    def propose(self, request: DraftRequest) -> list[Draft]:
        path = self._right_path(request)
        return [Draft(path, 1.0, self.name)] if path else []

    def propose_tree(self, request: DraftRequest, budget, vocab_size: int | None = None):
        from dresd.tree import DraftTree

        path = self._right_path(request, budget, vocab_size)
        return DraftTree.from_paths(request.tokens[-1], [(path, self.name)] if path else [],
                                    budget, vocab_size)

    def _right_path(self, request: DraftRequest, budget=None, vocab_size=None) -> tuple:
        if budget is None:
            self.composite.propose(request)
        else:
            self.composite.propose_tree(request, budget, vocab_size)
        truth = self._truth(request)
        paths = self.composite.open_candidates() or ()
        return max((p for p in paths if p == truth[: len(p)]), key=len, default=())

    def accept(self, tokens, hidden) -> None:
        self.composite.accept(tokens, hidden)

    def verified(self, tree_tokens: int, seconds: float) -> None:
        self.composite.verified(tree_tokens, seconds)
