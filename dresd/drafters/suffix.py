"""SuffixDecoding (Oliaro et al., arXiv 2411.04975) as a drafter, on Arctic Inference's own tree.

Two suffix trees, as in Arctic Inference's ``SuffixDecodingCache``: a global one over the store's
documents (its responses), built once per store and process, and a per-request one over the
prompt and the tokens generated so far. Each step both are asked for a continuation of the
context's longest matching suffix; the one whose draft scores higher wins (the score is the sum
of the draft tokens' estimated probabilities, i.e. the expected number of accepted tokens). The
draft is a frequency-weighted token tree whose size adapts to the match: at most
``max_spec_factor * match_len + max_spec_offset`` tokens, none less likely than
``min_token_prob`` (the paper's defaults: 1.0, 0.0, 0.1).

Unlike Arctic Inference's serving cache, the global tree is not extended with this process's
outputs: it holds exactly the store, like every other store-backed source here, so a comparison
with them reads the same corpus.

The tree itself is compiled from the ``arctic-inference`` source distribution by
``benchmarks/build_suffix_tree.py`` (``make install`` runs it) and imported as
``arctic_suffix_tree``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np

from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.rest import check_tokens, store_docs

BUILD_HINT = ("the suffix drafter needs SuffixDecoding's suffix tree: build it from "
              "arctic-inference's source with `python benchmarks/build_suffix_tree.py` "
              "(`make suffix-tree` runs it; `make test` and `make bench` do it first)")


def suffix_tree_module():
    try:
        import arctic_suffix_tree
    except ImportError as e:
        raise ImportError(f"{BUILD_HINT} ({e})") from None
    return arctic_suffix_tree


# one global tree per store object: building it reads every document once
_GLOBAL_TREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def global_tree(store, max_depth: int):
    """The suffix tree over ``store``'s documents (one sequence id per document)."""
    trees = _GLOBAL_TREES.setdefault(store, {})  # max_depth -> tree
    if max_depth not in trees:
        trees[max_depth] = tree_of(store_docs(store), max_depth,
                                   int(store.manifest.model.vocab_size))
    return trees[max_depth]


def tree_of(docs, max_depth: int, vocab_size: int | None = None):
    tree = suffix_tree_module().SuffixTree(max_depth)
    for seq_id, doc in enumerate(docs):
        doc = np.array(doc, dtype=np.int32)  # a writable copy: the binding refuses read-only
        if vocab_size is not None:
            check_tokens(doc, vocab_size)
        tree.extend_ndarray(seq_id, doc)
    return tree


class SuffixDrafter(Drafter):
    """SuffixDecoding: the likelier of the global (store) and per-request suffix trees' drafts."""

    name = "suffix"

    def __init__(self, global_tree=None, max_depth: int = 64, max_spec_factor: float = 1.0,
                 max_spec_offset: float = 0.0, min_token_prob: float = 0.1):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        if max_spec_factor < 0 or not 0 <= min_token_prob <= 1:
            raise ValueError("need max_spec_factor >= 0 and 0 <= min_token_prob <= 1")
        self.module = suffix_tree_module()
        self.global_tree = global_tree
        self.max_depth = max_depth
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self.min_token_prob = min_token_prob
        self.local_tree = None
        self.last_match_len = 0  # the winning draft's context match (0: none)

    @classmethod
    def from_store(cls, store, **kwargs) -> SuffixDrafter:
        max_depth = kwargs.get("max_depth", 64)
        return cls(global_tree(store, max_depth) if store is not None else None, **kwargs)

    @classmethod
    def from_config(cls, store, config) -> SuffixDrafter:
        """SuffixDecoding's own defaults; its tree size follows the budget's tree limit."""
        return cls.from_store(store)

    def begin(self, prompt_tokens: Sequence[int], prompt_hidden) -> None:
        self.local_tree = self.module.SuffixTree(self.max_depth)
        self.local_tree.extend_ndarray(0, np.asarray(prompt_tokens, dtype=np.int32))

    def accept(self, tokens: Sequence[int], hidden) -> None:
        if self.local_tree is None:
            raise RuntimeError("accept() before begin()")
        self.local_tree.extend_ndarray(0, np.asarray(tokens, dtype=np.int32))

    def speculate(self, context: Sequence[int], max_tokens: int):
        """The winning native draft (token_ids, parents, probs, score, match_len) or None.

        ``context`` ends with the decided token y; the drafts continue after it. The local tree
        holds the prompt and the committed tokens but not y yet (y is committed next step)."""
        if self.local_tree is None:
            raise RuntimeError("propose() before begin()")
        if max_tokens < 1:
            return None
        ctx = np.ascontiguousarray(np.asarray(context[-self.max_depth:], dtype=np.int32))
        best = None
        for tree in (self.local_tree, self.global_tree):
            if tree is None:
                continue
            d = tree.speculate_ndarray(ctx, max_tokens, self.max_spec_factor,
                                       self.max_spec_offset, self.min_token_prob, True)
            if d.token_ids and (best is None or d.score > best.score):
                best = d
        self.last_match_len = best.match_len if best is not None else 0
        return best

    def propose_tree(self, request: DraftRequest, budget, vocab_size: int | None = None):
        """SuffixDecoding's own token tree, cut to the budget's node limit."""
        from dresd.tree import DraftTree

        tree = DraftTree(request.tokens[-1])
        d = self.speculate(request.tokens, budget.max_tree_tokens - 1)
        if d is None:
            return tree
        nodes: list[int] = []  # draft index -> tree node
        for token, parent in zip(d.token_ids, d.parents):
            if vocab_size is not None and not 0 <= token < vocab_size:
                break  # the store was checked; the prompt's tokens come from the tokenizer
            at = nodes[parent] if parent >= 0 else 0
            if at < 0:
                nodes.append(-1)
                continue
            nodes.append(tree.child(at, int(token), budget.max_tree_tokens))
        return tree

    def propose(self, request: DraftRequest) -> list[Draft]:
        """The tree's root-to-leaf paths (for merging with other sources), each scored by its
        leaf's estimated probability (in (0, 1]), best first."""
        d = self.speculate(request.tokens, request.num_drafts * request.draft_len)
        if d is None:
            return []
        paths: list[tuple[int, ...]] = []
        is_leaf = [True] * len(d.token_ids)
        for i, parent in enumerate(d.parents):
            prefix = paths[parent] if parent >= 0 else ()
            paths.append(prefix + (int(d.token_ids[i]),))
            if parent >= 0:
                is_leaf[parent] = False
        leaves = [Draft(paths[i][: request.draft_len], float(d.probs[i]), self.name)
                  for i in range(len(paths)) if is_leaf[i]]
        leaves.sort(key=lambda x: -x.score)
        return leaves[: request.num_drafts]
