"""The composite's candidate trie and its hand-built node estimates (dresd.drafters.composite).

One step, in four parts:

1. ``gather``: every source's drafts (best score first) merged into one trie rooted at ``y``;
   per node, what each source says about it (``CandidateNode.weight``, ``best``, ``count``).
2. ``estimate_hand_built``: per node, parents first, the conditional estimate ``q`` (the
   likeliest of its sources: hit rate at its depth times its share of the parent) and from it
   the path estimates ``raw`` (siblings share one token), ``calibrated`` (times ``g(d)``) and
   ``prob`` (times its reliability bin's ratio). The composite's module docstring gives the why.
3. ``feature_rows``: the same quantities as the node model's features, a row per node.
4. ``path_products``: per-node conditionals (the node model's) back into path probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dresd.draft import Draft
from dresd.tree import DraftTree


@dataclass
class CandidateNode:
    """One node of the candidate trie. The root (node 0, ``y``) is certain: its estimates stay 1.

    Invariants: ``weight``, ``best`` and ``count`` have the same keys, the sources with a draft
    through the node (every node but the root has one); once ``estimate_hand_built`` ran, a
    node's ``raw``, ``calibrated`` and ``prob`` are at most its parent's, and the ``raw`` of
    siblings sum to at most their parent's (the model picks one token)."""

    weight: dict[int, float] = field(default_factory=dict)  # source -> sum of 1 / (rank + 1)
    best: dict[int, float] = field(default_factory=dict)  # source -> its best draft's score
    count: dict[int, int] = field(default_factory=dict)  # source -> its drafts through the node
    # Set on a node with children (from its children's weights and q):
    below: dict[int, float] = field(default_factory=dict)  # source -> weight of its children
    q_total: float = 1.0  # max(1, sum of the children's q): what their q is divided by
    # Set on every node but the root, parents first:
    q: float = 1.0  # max over its sources s of h_s(depth) * weight_s / parent.below_s
    raw: float = 1.0  # parent.raw * q / parent.q_total: the sources' path product
    calibrated: float = 1.0  # min(parent.calibrated, raw * g(depth))
    bin: int = 0  # the reliability bin ``calibrated`` falls in
    prob: float = 1.0  # min(parent.prob, calibrated * ratio(bin)): the hand-built estimate


@dataclass
class CandidateTrie:
    tree: DraftTree  # the tokens; parents precede children
    nodes: list[CandidateNode]  # nodes[i] is tree node i

    def __len__(self) -> int:
        return len(self.nodes)


def gather(proposals: Sequence[Sequence[Draft] | None], y: int, draft_len: int) -> CandidateTrie:
    """Every source's drafts (``proposals[s]``: source s's, None or empty when it has none),
    cut to ``draft_len``, merged into one trie rooted at ``y``. A draft of rank r among its
    source's (best score first) adds 1 / (r + 1) to the source's weight of every node on its
    path."""
    trie = CandidateTrie(DraftTree(int(y)), [CandidateNode()])
    for s, drafts in enumerate(proposals):
        ranked = sorted(drafts or (), key=lambda x: -x.score)
        for rank, draft in enumerate(ranked):
            w = 1.0 / (rank + 1)
            node = 0
            for t in draft.tokens[:draft_len]:
                node = trie.tree.child(node, int(t))
                if node == len(trie.nodes):
                    trie.nodes.append(CandidateNode())
                record = trie.nodes[node]
                record.weight[s] = record.weight.get(s, 0.0) + w
                record.best.setdefault(s, draft.score)  # ranked best first: the first is best
                record.count[s] = record.count.get(s, 0) + 1
    return trie


def estimate_hand_built(trie: CandidateTrie, rates: Sequence[Sequence[float] | None],
                        calib: Sequence[float], edges: np.ndarray, ratios: np.ndarray) -> None:
    """Fill every node's estimates, parents first. ``rates[s][d - 1]``: source s's conditional
    hit rate at depth d (None for a source with no drafts); ``calib[d]``: ``g(d)`` (``calib[0]``
    is the root's, 1); ``edges``: the reliability bins' edges; ``ratios``: each bin's ratio."""
    tree, nodes = trie.tree, trie.nodes
    for p, parent in enumerate(nodes):  # parents precede children: the parent's are final
        kids = list(tree.children(p).values())
        if not kids:
            continue
        for c in kids:
            for s, w in nodes[c].weight.items():
                parent.below[s] = parent.below.get(s, 0.0) + w
        d = tree.depths[p] + 1
        for c in kids:
            nodes[c].q = _conditional(nodes[c], parent, rates, d)
        parent.q_total = max(1.0, sum(nodes[c].q for c in kids))
        scale = parent.raw / parent.q_total
        for c in kids:
            node = nodes[c]
            node.raw = node.q * scale
            node.calibrated = min(parent.calibrated, node.raw * calib[d])
            node.bin = int(np.searchsorted(edges, node.calibrated, "right"))
            node.prob = min(parent.prob, node.calibrated * ratios[node.bin])


def _conditional(node: CandidateNode, parent: CandidateNode,
                 rates: Sequence[Sequence[float] | None], depth: int) -> float:
    """A node's hand-built conditional estimate: the largest over its sources of the source's
    hit rate at ``depth`` times its share (its weight here over its weight below the parent).
    The largest, not a noisy OR: sources proposing the same text are not independent."""
    return max(rates[s][depth - 1] * w / parent.below[s] for s, w in node.weight.items())


def feature_count(num_sources: int) -> int:
    """The node model's features: depth, siblings, sources proposing the node; per source
    whether it proposes the node, its share of the source's drafts under the parent, that share
    times the source's hit rate, the best score and log(1 + number) of its drafts through the
    node; and the log of the raw conditional estimate (before g(d) and the reliability map)."""
    return 3 + 5 * num_sources + 1


def feature_rows(trie: CandidateTrie, rates: Sequence[Sequence[float] | None],
                 num_sources: int) -> np.ndarray:
    """The node model's features (``feature_count``), a row per node below the root in node
    order; ``estimate_hand_built`` must have run on ``trie``."""
    tree, nodes = trie.tree, trie.nodes
    rows = []
    for c in range(1, len(nodes)):
        node, p = nodes[c], tree.parents[c]
        parent = nodes[p]
        d = tree.depths[c]
        per_source = [0.0] * (5 * num_sources)
        for s, w in node.weight.items():
            share = w / parent.below[s]
            per_source[5 * s : 5 * s + 5] = (1.0, share, rates[s][d - 1] * share, node.best[s],
                                             math.log1p(node.count[s]))
        rows.append([d, len(tree.children(p)), len(node.weight), *per_source,
                     math.log(max(node.q / parent.q_total, 1e-6))])
    return np.array(rows, np.float64)


def path_products(tree: DraftTree, conditional: np.ndarray) -> list[float]:
    """Per node, the product of the conditionals along its path, those under one parent
    first scaled to sum to at most 1 (the model emits one token)."""
    n = len(tree)
    total = np.zeros(n)
    np.add.at(total, tree.parents[1:], conditional[1:])
    probs = [1.0] * n
    for c in range(1, n):
        p = tree.parents[c]
        probs[c] = probs[p] * conditional[c] / max(1.0, total[p])
    return probs
