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
