"""The context drafter: dense retrieval over this generation's own committed text.

Its keys are the hidden states the target model has already computed for the prompt and for the
tokens accepted so far (no extra forward pass), transformed like a store's keys (the store's
fitted transform when one is given, else the L2-normalised raw state). The key at position i is
the state that predicted token i + 1; it is filed under that next token, and its value is the
text after it. A query for the decided token y searches only the keys whose next token is y (the
store's first-token filter) by exact inner product, and drafts what followed them.

Only committed tokens are ever keys or values: the state that predicted y becomes a key when y is
committed (in ``accept``), and a value never reaches past the last committed token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dresd.drafters.base import Draft, Drafter, DraftRequest


class ContextDrafter(Drafter):
    name = "context"

    def __init__(self, transform=None, k: int = 10):
        """``transform``: a KeyTransform (a store's), or None for L2-normalised raw states;
        ``k``: nearest keys retrieved per step, each one draft."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.transform = transform
        self.k = k
        self._reset()

    @classmethod
    def from_config(cls, store, config) -> ContextDrafter:
        """Keys transformed as the store's when there is one, so both searches agree."""
        return cls(store.transform if store is not None else None, k=config.k)

    def _reset(self) -> None:
        self.tokens: list[int] = []  # committed: the prompt and every accepted token
        self._keys = np.zeros((0, 0), np.float32)  # row i: the state at position i
        self._num_keys = 0  # rows in use; always len(tokens) - 1 once begun
        self._by_next: dict[int, list[int]] = {}  # next token -> key rows
        self._pending: np.ndarray | None = None  # the state that predicted y, not yet a key

    @property
    def num_keys(self) -> int:
        return self._num_keys

    def embed(self, hidden: torch.Tensor) -> np.ndarray:
        """Hidden states [n, H] -> keys [n, d], unit norm, float32 on the CPU."""
        if self.transform is not None:
            out = self.transform.torch_apply(hidden)
        else:
            out = torch.nn.functional.normalize(hidden.float(), dim=-1)
        return out.cpu().numpy()

    def begin(self, prompt_tokens: Sequence[int], prompt_hidden: torch.Tensor) -> None:
        self._reset()
        if len(prompt_tokens) != prompt_hidden.shape[0]:
            raise ValueError(f"{len(prompt_tokens)} prompt tokens but {prompt_hidden.shape[0]} "
                             "hidden states")
        rows = self.embed(prompt_hidden)
        self.tokens = [int(t) for t in prompt_tokens]
        self._keys = np.zeros((max(64, 2 * len(rows)), rows.shape[1]), np.float32)
        self._add(rows[:-1])  # row i predicted tokens[i + 1], which is committed
        self._pending = rows[-1]

    def accept(self, tokens: Sequence[int], hidden: torch.Tensor) -> None:
        if self._pending is None:
            raise RuntimeError("ContextDrafter.accept before begin")
        if len(tokens) != hidden.shape[0]:
            raise ValueError(f"{len(tokens)} tokens but {hidden.shape[0]} hidden states")
        rows = self.embed(hidden)
        # Row j of ``hidden`` is the state at tokens[j]; the pending state predicted tokens[0].
        self.tokens.extend(int(t) for t in tokens)
        self._add(np.concatenate([self._pending[None], rows[:-1]]))
        self._pending = rows[-1]

    def _add(self, rows: np.ndarray) -> None:
        start, n = self._num_keys, len(rows)
        if start + n > len(self._keys):
            grown = np.zeros((max(2 * len(self._keys), start + n), self._keys.shape[1]),
                             np.float32)
            grown[:start] = self._keys[:start]
            self._keys = grown
        self._keys[start : start + n] = rows
        for i in range(start, start + n):
            self._by_next.setdefault(self.tokens[i + 1], []).append(i)
        self._num_keys = start + n

    def propose(self, request: DraftRequest) -> list[Draft]:
        if self._pending is None:
            raise RuntimeError("ContextDrafter.propose before begin")
        if len(request.tokens) != len(self.tokens) + 1:
            raise RuntimeError(
                f"the request holds {len(request.tokens)} tokens, but {len(self.tokens)} are "
                "committed: the request must be the committed tokens plus y"
            )
        y = int(request.tokens[-1])
        rows = self._by_next.get(y)
        if not rows or request.draft_len < 1:
            return []
        query = self.embed(request.hidden[None])[0]
        idx = np.asarray(rows[::-1])  # latest first, so ties go to the most recent text
        # torch, not numpy: numpy's BLAS threads would spin beside torch's, as faiss's do
        # (dresd.search._single_threaded)
        scores = torch.mv(torch.from_numpy(self._keys[idx]), torch.from_numpy(query)).numpy()
        order = np.argsort(-scores, kind="stable")
        drafts, seen = [], set()
        limit = min(self.k, request.num_drafts)
        for j in order:
            # Key row i predicted tokens[i + 1] == y; the draft is what followed y.
            start = int(idx[j]) + 2
            cont = tuple(self.tokens[start : start + request.draft_len])
            if cont and cont not in seen:
                seen.add(cont)
                drafts.append(Draft(cont, float(scores[j]), self.name))
                if len(drafts) >= limit:
                    break
        return drafts
