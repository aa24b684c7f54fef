"""Draft trees: merge draft continuations into a token trie, verify it in one forward, prune.

``DraftTree`` is the one token trie of the runtime: drafters' drafts are merged into it, the
composite builds its candidate trie in it and the budget selects among its nodes (dresd.budget),
and the decoder verifies it. A tree is rooted at ``y``, the token the model has already decided but not yet written to its KV
cache. Node 0 is the root; every other node is one draft token, and a node's index is always
larger than its parent's, so the root-to-node path of any node is increasing and the best draft
(inserted first) occupies the contiguous indices 0..L.

Verification runs the standard transformers forward over all nodes at once, with a 4D float
attention mask (each node sees the cached prefix and its own ancestors) and explicit position ids
(prefix length + depth). Afterwards only the cache entries of the accepted path are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from dresd.draft import Draft


def check_int(name: str, value, minimum: int, note: str = "") -> None:
    """Refuse a ``value`` of the setting ``name`` that is not an int (a bool is not one), a
    TypeError, or is below ``minimum``, a ValueError; ``note`` says what the bound means."""
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {kind}{note}, not {value!r:.60}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{note}, not {value!r}")


@dataclass(frozen=True)
class TreeBudget:
    num_drafts: int = 10  # drafts taken, best score first
    draft_len: int = 10  # tokens kept of each draft
    max_tree_tokens: int = 64  # nodes including the root

    def __post_init__(self):
        check_int("num_drafts", self.num_drafts, 0)
        check_int("draft_len", self.draft_len, 0)
        check_int("max_tree_tokens", self.max_tree_tokens, 1, " (the root)")


class DraftTree:
    """A token trie rooted at the decided token; flattened in insertion order."""

    def __init__(self, root: int):
        self.tokens: list[int] = [int(root)]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self._children: list[dict[int, int]] = [{}]

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, root: int, drafts: Sequence[Draft], budget: TreeBudget,
              vocab_size: int | None = None) -> DraftTree:
        """Merge the highest-scoring drafts under the budget (see ``from_paths``)."""
        ranked = sorted(drafts, key=lambda d: -d.score)[: budget.num_drafts]
        return cls.from_paths(root, [(d.tokens, d.source) for d in ranked], budget, vocab_size)

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[tuple[Sequence[int], str]],
                   budget: TreeBudget, vocab_size: int | None = None) -> DraftTree:
        """Insert ``(tokens, source)`` paths in order, each cut to ``budget.draft_len``.

        When the node budget runs out mid-path, the prefix that fits is kept, since a prefix is
        still a useful (and the likeliest) guess, and later paths are dropped.
        """
        tree = cls(root)
        for toks, source in paths:
            toks = toks[: budget.draft_len]
            if vocab_size is not None:
                bad = [t for t in toks if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(
                        f"drafter {source or '?'} proposed token ids outside the "
                        f"vocabulary of size {vocab_size}: {bad[:5]}"
                    )
            if tree.add(toks, budget.max_tree_tokens) < 0:
                return tree
        return tree

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> DraftTree:
        """The shape of a trie given by its parent list (node 0 the root, parents first);
        each node's token is its own index."""
        tree = cls(0)
        for i in range(1, len(parents)):
            if not 0 <= parents[i] < i:
                raise ValueError(f"node {i} has parent {parents[i]}: parents must precede "
                                 "children")
            tree.child(parents[i], i)
        return tree

    def add(self, tokens: Sequence[int], limit: int | None = None) -> int:
        """Insert a path below the root; its last node, or -1 when ``limit`` nodes were
        reached first (the part that fitted stays)."""
        node = 0
        for t in tokens:
            node = self.child(node, int(t), limit)
            if node < 0:
                return -1
        return node

    def child(self, node: int, token: int, limit: int | None = None) -> int:
        """The child of ``node`` for ``token``, created unless the tree holds ``limit`` nodes
        (then -1)."""
        existing = self._children[node].get(token)
        if existing is not None:
            return existing
        if limit is not None and len(self.tokens) >= limit:
            return -1
        idx = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(node)
        self.depths.append(self.depths[node] + 1)
        self._children.append({})
        self._children[node][token] = idx
        return idx

    def children(self, node: int) -> dict[int, int]:
        """token -> child node index, in insertion (best score first) order."""
        return self._children[node]

    def height_below(self, node: int) -> int:
        """Length of the longest path from ``node`` down to a leaf."""
        best = 0
        stack = [(node, 0)]
        while stack:
            n, h = stack.pop()
            best = max(best, h)
            stack.extend((c, h + 1) for c in self._children[n].values())
        return best

    def cut(self, max_depth: int) -> DraftTree:
        """This tree without its nodes deeper than ``max_depth`` (itself when none is); the
        nodes kept stay in order, so the best draft still comes first."""
        if max(self.depths) <= max_depth:
            return self
        tree = DraftTree(self.tokens[0])
        index = [0] * len(self.tokens)  # old node -> new node
        for i in range(1, len(self.tokens)):  # parents precede children
            if self.depths[i] <= max_depth:
                index[i] = tree.child(index[self.parents[i]], self.tokens[i])
        return tree

    def ancestor_matrix(self) -> np.ndarray:
        """bool [n, n]: entry (i, j) is true when j is i or one of i's ancestors."""
        n = len(self.tokens)
        anc = np.eye(n, dtype=bool)
        for i in range(1, n):  # parents precede children, so their rows are complete
            anc[i] |= anc[self.parents[i]]
        return anc

    def attention_mask(self, past_len: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Float mask [1, 1, n, past_len + n]: 0 where attention is allowed, dtype min elsewhere."""
        n = len(self.tokens)
        allowed = np.ones((n, past_len + n), dtype=bool)
        allowed[:, past_len:] = self.ancestor_matrix()
        mask = torch.full((n, past_len + n), torch.finfo(dtype).min, dtype=dtype)
        mask.masked_fill_(torch.from_numpy(allowed), 0.0)
        return mask[None, None].to(device)

    def position_ids(self, past_len: int, device) -> torch.Tensor:
        return (torch.tensor(self.depths, dtype=torch.long) + past_len)[None].to(device)

    def input_ids(self, device) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.long)[None].to(device)

    def token_paths(self) -> list[tuple[int, ...]]:
        """Per node, the tokens from below the root down to it (the root's is empty)."""
        paths: list[tuple[int, ...]] = [()]
        for i in range(1, len(self.tokens)):  # parents precede children
            paths.append(paths[self.parents[i]] + (self.tokens[i],))
        return paths

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


@dataclass
class TreeOutput:
    logits: torch.Tensor  # [n, V] float32, row i predicts the token after node i
    hidden: torch.Tensor  # [n, H] final hidden states


def model_forward(model, input_ids, cache, position_ids=None, attention_mask=None,
                  logits_to_keep: int = 0) -> TreeOutput:
    """One forward of the standard transformers model, returning logits and final states.

    ``logits_to_keep`` = 1 computes the LM head for the last position only (the prefill needs
    every hidden state but one row of logits, and a vocabulary-wide head over a long prompt is
    a measurable share of a CPU prefill); 0 keeps all.
    """
    out = model(
        input_ids=input_ids,
        cache=cache,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=logits_to_keep,
    )
    return TreeOutput(logits=out.logits[0].float(), hidden=out.hidden_states[-1][0])


def verify_tree(model, tree: DraftTree, cache) -> TreeOutput:
    """Run every node of ``tree`` through ``model`` in one forward, appending to ``cache``."""
    past = cache.get_seq_length()
    device = model.device
    dtype = model.dtype
    return model_forward(
        model,
        tree.input_ids(device),
        cache,
        position_ids=tree.position_ids(past, device),
        attention_mask=tree.attention_mask(past, dtype, device),
    )


def prune_cache(cache, past_len: int, tree_len: int, path: Sequence[int]) -> None:
    """Keep the cached prefix and the accepted path's entries; drop the other tree nodes.

    ``path`` holds tree node indices (increasing). When the path is the tree's first nodes, a
    crop suffices; otherwise every layer's keys and values are index-selected on the sequence
    dimension.
    """
    path = list(path)
    if cache.get_seq_length() != past_len + tree_len:
        raise ValueError(
            f"cache holds {cache.get_seq_length()} positions, expected {past_len} + {tree_len}"
        )
    if path == list(range(len(path))):
        drop = tree_len - len(path)
        if drop:
            cache.crop(-drop)
        return
    _select(cache, list(range(past_len)) + [past_len + i for i in path])


def _select(cache, keep: list[int]) -> None:
    idx = None
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if idx is None or idx.device != layer.keys.device:
            idx = torch.tensor(keep, dtype=torch.long, device=layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)
