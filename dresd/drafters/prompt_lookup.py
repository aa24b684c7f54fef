"""Prompt lookup: draft what followed earlier occurrences of the sequence's last n tokens.

The idea of transformers' ``prompt_lookup_num_tokens`` (PromptLookupCandidateGenerator): take
the last ``n`` tokens of the sequence (prompt + generated + ``y``), find them earlier in the same
sequence and propose the tokens that followed, trying ``n`` from ``max_ngram`` down to
``min_ngram``. Unlike transformers, which proposes one continuation, this drafter proposes up to
``num_drafts`` distinct ones for the draft tree:

- longer n-gram matches rank above shorter ones, and within one ``n`` the most recent match
  ranks first;
- only the ``max_matches`` most recent occurrences of each n-gram are looked at, so a step costs
  O(max_matches) however long and repetitive the sequence is;
- a continuation equal to, or a prefix of, a higher-ranked one adds no tree node and is skipped;
- ``score`` is ``(n - 1 + 1 / (r + 1)) / max_ngram`` for the r-th kept draft of an n-gram
  match: in (0, 1], ordered by match length, then recency.

The index is incremental: a dict from each n-gram (``min_ngram <= n <= max_ngram``) to the end
positions of its occurrences, in increasing order. ``begin`` indexes the prompt; each step only
the tokens appended since the last step are indexed, so a step never rescans the sequence.
Drafts are always slices of the sequence itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from dresd.drafters.base import Draft, Drafter, DraftRequest


class PromptLookupDrafter(Drafter):
    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 64):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {max_matches}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_matches = max_matches
        self._reset()

    @classmethod
    def from_config(cls, store, config) -> PromptLookupDrafter:
        return cls()

    def _reset(self) -> None:
        self._seq: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}
        self._y_indexed = False  # the last token indexed is the y of the last propose

    def begin(self, prompt_tokens: Sequence[int], prompt_hidden=None) -> None:
        self._reset()
        self._extend(prompt_tokens)

    def accept(self, tokens: Sequence[int], hidden=None) -> None:
        """Committed tokens (``y`` first). When ``propose`` ran this step, ``y`` is indexed
        already and only the accepted draft tokens are added."""
        tokens = [int(t) for t in tokens]
        self._extend(tokens[1:] if self._y_indexed else tokens)
        self._y_indexed = False

    def _extend(self, tokens: Sequence[int]) -> None:
        seq, ends = self._seq, self._ends
        lo, hi = self.min_ngram, self.max_ngram
        for t in tokens:
            seq.append(int(t))
            e = len(seq) - 1
            for n in range(lo, min(hi, e + 1) + 1):
                key = tuple(seq[e - n + 1 :])
                lst = ends.get(key)
                if lst is None:
                    ends[key] = [e]
                else:
                    lst.append(e)

    def _sync(self, tokens: Sequence[int]) -> None:
        """Make the index cover exactly ``tokens``, indexing only what is new."""
        seq = self._seq
        k = len(seq)
        if len(tokens) >= k and (k == 0 or (tokens[k - 1] == seq[-1] and tokens[0] == seq[0])):
            if len(tokens) > k:
                self._extend(tokens[k:])
            return
        self._reset()  # not a continuation of what was indexed (no begin, or a new sequence)
        self._extend(tokens)

    def propose(self, request: DraftRequest) -> list[Draft]:
        self._sync(request.tokens)
        self._y_indexed = True
        seq = self._seq
        last = len(seq) - 1
        limit, num = request.draft_len, request.num_drafts
        drafts: list[Draft] = []
        if limit < 1 or num < 1:
            return drafts
        kept: list[tuple[int, ...]] = []
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            ends = self._ends.get(tuple(seq[last - n + 1 :]))
            if not ends:
                continue
            rank = 0
            # The newest occurrence is the sequence's own suffix; it has no continuation.
            stop = max(-1, len(ends) - 1 - self.max_matches - (ends[-1] == last))
            for i in range(len(ends) - 1, stop, -1):
                e = ends[i]
                if e >= last:
                    continue
                cont = tuple(seq[e + 1 : e + 1 + limit])
                if any(k[: len(cont)] == cont for k in kept):
                    continue
                kept.append(cont)
                score = (n - 1 + 1 / (rank + 1)) / self.max_ngram
                drafts.append(Draft(cont, score, self.name))
                rank += 1
                if len(drafts) >= num:
                    return drafts
        return drafts
