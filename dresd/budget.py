"""How many draft tokens to verify per step: a fixed budget, or one fitted to the device.

A verify pass of n tree tokens costs c(n) on the device (``dresd.calibrate`` measures it). If a
step's candidate nodes are taken best first, node i with probability p_i of being accepted (the
product of its conditional acceptance estimates along its path), a tree of the first n nodes
emits 1 + sum(p_1..p_n) tokens in expectation, so it yields

    (1 + sum_{i<=n} p_i) / (c(n + 1) + overhead)

tokens per second (n + 1 tree tokens: the root is the decided token). ``CalibratedBudget`` picks
the n that maximises this; ``FixedBudget`` always takes as many nodes as the cap allows.

Taking nodes best first by p keeps the chosen set a valid subtree (a child is never likelier
than its parent), and for each size n it is the set with the largest expected acceptance, so
maximising over n also maximises over all subtrees. That holds for any cost curve, monotone or
not (on a CPU it is not: see dresd.calibrate).
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dresd.calibrate import Calibration


class BudgetPolicy:
    """Chooses how many of the best-first candidate nodes a step verifies."""

    max_tree_tokens: int = 64  # nodes including the root

    def size(self, gains: Sequence[float], overhead_s: float = 0.0) -> int:
        """``gains``: acceptance probabilities of the candidates in best-first order
        (non-increasing); ``overhead_s``: per-step cost outside the verify pass."""
        raise NotImplementedError


@dataclass
class FixedBudget(BudgetPolicy):
    """Fill the tree up to ``max_tree_tokens`` (the plain ``TreeBudget`` behaviour)."""

    max_tree_tokens: int = 64

    def __post_init__(self):
        if self.max_tree_tokens < 1:
            raise ValueError("max_tree_tokens must be >= 1 (the root)")

    def size(self, gains: Sequence[float], overhead_s: float = 0.0) -> int:
        return min(len(gains), self.max_tree_tokens - 1)


@dataclass
class CalibratedBudget(BudgetPolicy):
    """Maximise expected tokens per second under the device's measured verify cost."""

    calibration: Calibration
    max_tree_tokens: int = 64

    def __post_init__(self):
        if self.max_tree_tokens < 1:
            raise ValueError("max_tree_tokens must be >= 1 (the root)")

    def objective(self, nodes: int, expected_accepted: float, overhead_s: float = 0.0) -> float:
        """Expected tokens per second of a tree with ``nodes`` draft nodes under the root."""
        return (1.0 + expected_accepted) / (self.calibration.cost(nodes + 1) + overhead_s)

    def size(self, gains: Sequence[float], overhead_s: float = 0.0) -> int:
        m = min(len(gains), self.max_tree_tokens - 1)
        if m == 0:
            return 0
        expected = np.concatenate([[0.0], np.cumsum(np.asarray(gains[:m], np.float64))])
        cost = self.calibration.cost(np.arange(1, m + 2))
        rate = (1.0 + expected) / (cost + overhead_s)
        return int(np.argmax(rate))  # the first maximum: the smaller tree on ties


def select_nodes(
    parents: Sequence[int],
    probs: Sequence[float],
    policy: BudgetPolicy,
    max_leaves: int | None = None,
    max_depth: int | None = None,
    overhead_s: float = 0.0,
) -> list[int]:
    """The nodes of a candidate trie to verify, best first.

    ``parents[i]`` is node i's parent (node 0 is the root, parents precede children);
    ``probs[i]`` its estimated probability of being accepted, which must not exceed its parent's.
    Nodes are taken in order of probability from the root's frontier, skipping those that would
    pass ``max_depth`` or make more than ``max_leaves`` leaves (drafts); ``policy`` then keeps a
    prefix of that order. Every prefix is a subtree, and the leaf count never falls along the
    order, so the result respects both limits.
    """
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    depth = [0] * n
    for i in range(1, n):
        if not 0 <= parents[i] < i:
            raise ValueError(f"node {i} has parent {parents[i]}: parents must precede children")
        children[parents[i]].append(i)
        depth[i] = depth[parents[i]] + 1
    cap = policy.max_tree_tokens - 1
    frontier = [(-float(probs[c]), c) for c in children[0]]
    heapq.heapify(frontier)
    order: list[int] = []
    has_child = [False] * n
    leaves = 0
    while frontier and len(order) < cap:
        _, c = heapq.heappop(frontier)
        if max_depth is not None and depth[c] > max_depth:
            continue
        par = parents[c]
        grows = par == 0 or has_child[par]  # a new branch, not the extension of a leaf
        if grows and max_leaves is not None and leaves >= max_leaves:
            continue
        leaves += grows
        has_child[par] = True
        order.append(c)
        for g in children[c]:
            heapq.heappush(frontier, (-float(probs[g]), g))
    keep = policy.size([float(probs[c]) for c in order], overhead_s)
    return order[:keep]


_CALIBRATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibrated_budget(model, tokenizer=None, fingerprint: str | None = None,
                      max_tree_tokens: int = 64, refresh: bool = False) -> CalibratedBudget:
    """The budget for ``model`` on its device: its saved calibration (``dresd calibrate``),
    measured and saved on first use. ``fingerprint`` (a store's records it) saves computing the
    model's; the calibration is also kept in memory per model object, device and dtype."""
    from dresd.calibrate import load_or_measure

    param = next(model.parameters())
    key = (str(param.device), param.dtype)
    cached = _CALIBRATIONS.get(model)
    if cached is None or cached[0] != key or refresh:
        if fingerprint is None:
            if tokenizer is None:
                raise ValueError("calibrated_budget needs the tokenizer or the fingerprint")
            from dresd.models import model_fingerprint

            fingerprint = model_fingerprint(model, tokenizer)
        cached = (key, load_or_measure(model, fingerprint, refresh=refresh))
        _CALIBRATIONS[model] = cached
    return CalibratedBudget(cached[1], max_tree_tokens)
