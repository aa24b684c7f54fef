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

The saved curve is only a starting point. The decoder reports the wall time of every verify pass
(``observe``), and ``CalibratedBudget`` reads its costs from ``VerifyCost``: the saved curve
rescaled, size by size, by what this process measured (a running mean per size, interpolated
between measured sizes, bounded by the measured sizes on either side since a larger tree never
costs less). A curve saved while the machine was busy is corrected within a generation. Sizes the
budget never chooses are never measured, so when it has verified nothing but the root for
``explore_every`` steps while candidates were offered, it verifies the tree it would choose if
every size cost what one token does (at most ``explore_tokens`` nodes): a bounded price (one
such pass per ``explore_every`` steps) for never being locked out by a curve that overstates
what drafting costs. Conversely, a one-token pass happens on its own whenever no source has a
candidate; if none has been measured after ``explore_every`` steps, the budget verifies the
root alone once, so a curve that overstates one token's cost is corrected too.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dresd.calibrate import Calibration
from dresd.tree import DraftTree


class BudgetPolicy:
    """Chooses how many of the best-first candidate nodes a step verifies."""

    max_tree_tokens: int = 64  # nodes including the root

    def size(self, gains: Sequence[float], overhead_s: float = 0.0) -> int:
        """``gains``: acceptance probabilities of the candidates in best-first order
        (non-increasing); ``overhead_s``: per-step cost outside the verify pass."""
        raise NotImplementedError

    def observe(self, tree_tokens: int, seconds: float) -> None:
        """The measured wall time of a verify pass over ``tree_tokens`` tokens (root included)."""


@dataclass
class FixedBudget(BudgetPolicy):
    """Fill the tree up to ``max_tree_tokens`` (the plain ``TreeBudget`` behaviour)."""

    max_tree_tokens: int = 64

    def __post_init__(self):
        if self.max_tree_tokens < 1:
            raise ValueError("max_tree_tokens must be >= 1 (the root)")

    def size(self, gains: Sequence[float], overhead_s: float = 0.0) -> int:
        return min(len(gains), self.max_tree_tokens - 1)


class VerifyCost:
    """Seconds per verify pass by tree size: a saved calibration corrected by measured passes.

    Per measured size, a running mean of log(measured / saved) (the first pass counts in full,
    later ones with weight ``1 / count`` down to ``rate``); other sizes take the ratio
    interpolated between measured sizes (the nearest one beyond them), and every estimate is
    kept between the measured costs of the nearest smaller and larger measured sizes."""

    def __init__(self, calibration: Calibration, rate: float = 0.2):
        self.calibration = calibration
        self.rate = rate
        self._log_ratio: dict[int, float] = {}
        self._count: dict[int, int] = {}
        # measured sizes, their log ratios, and the lower / upper bounds at each of them
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def measured_size(self, n: int) -> bool:
        return n in self._count

    def observe(self, tree_tokens: int, seconds: float) -> None:
        if tree_tokens < 1 or not seconds > 0 or not np.isfinite(seconds):
            return
        r = float(np.log(seconds / self.calibration.cost(tree_tokens)))
        c = self._count.get(tree_tokens, 0) + 1
        w = max(1.0 / c, self.rate)
        self._log_ratio[tree_tokens] = (1 - w) * self._log_ratio.get(tree_tokens, r) + w * r
        self._count[tree_tokens] = c
        self._table = None

    @property
    def measured(self) -> dict[int, float]:
        """Measured sizes and their current estimates, in seconds."""
        return {n: self.calibration.cost(n) * float(np.exp(r))
                for n, r in sorted(self._log_ratio.items())}

    def cost(self, n: int | np.ndarray) -> float | np.ndarray:
        saved = self.calibration.cost(n)
        if not self._log_ratio:
            return saved
        if self._table is None:
            sizes = np.array(sorted(self._log_ratio), np.float64)
            ratios = np.array([self._log_ratio[int(k)] for k in sizes])
            secs = self.calibration.cost(sizes) * np.exp(ratios)
            # cost never falls with size: bounds from the measured sizes below and above
            self._table = (sizes, ratios, np.maximum.accumulate(secs),
                           np.minimum.accumulate(secs[::-1])[::-1])
        sizes, ratios, below, above = self._table
        est = saved * np.exp(np.interp(n, sizes, ratios))
        i = np.searchsorted(sizes, n, side="right")  # measured sizes <= n: sizes[:i]
        lo = np.where(i > 0, below[np.maximum(i - 1, 0)], 0.0)
        j = np.searchsorted(sizes, n, side="left")  # measured sizes >= n: sizes[j:]
        hi = np.where(j < len(sizes), above[np.minimum(j, len(sizes) - 1)], np.inf)
        c = np.minimum(np.maximum(est, lo), hi)
        return float(c) if np.ndim(c) == 0 else c


@dataclass
class CalibratedBudget(BudgetPolicy):
    """Maximise expected tokens per second under the device's verify cost: the saved
    calibration, corrected by the passes this process measures (see the module docstring)."""

    calibration: Calibration
    max_tree_tokens: int = 64
    explore_every: int = 64
    explore_tokens: int = 8
    costs: VerifyCost | None = field(default=None, repr=False)  # shared by a process's budgets

    def __post_init__(self):
        if self.max_tree_tokens < 1:
            raise ValueError("max_tree_tokens must be >= 1 (the root)")
        if self.costs is None:
            self.costs = VerifyCost(self.calibration)
        self._root_only = 0  # steps in a row that verified only the root though offered more
        self._steps = 0
        self._root_tried = False
        self.explored = 0  # exploration passes so far

    def observe(self, tree_tokens: int, seconds: float) -> None:
        self.costs.observe(tree_tokens, seconds)

    def cost(self, n: int | np.ndarray) -> float | np.ndarray:
        return self.costs.cost(n)

    def objective(self, nodes: int, expected_accepted: float, overhead_s: float = 0.0) -> float:
        """Expected tokens per second of a tree with ``nodes`` draft nodes under the root."""
        return (1.0 + expected_accepted) / (self.cost(nodes + 1) + overhead_s)

    def size(self, gains: Sequence[float], overhead_s: float = 0.0) -> int:
        m = min(len(gains), self.max_tree_tokens - 1)
        if m == 0:
            return 0
        expected = np.concatenate([[0.0], np.cumsum(np.asarray(gains[:m], np.float64))])
        cost = np.maximum.accumulate(self.cost(np.arange(1, m + 2)))
        best = int(np.argmax((1.0 + expected) / (cost + overhead_s)))  # first max: smaller tree
        self._steps += 1
        if best:
            self._root_only = 0
            if (self.explore_every and self._steps >= self.explore_every
                    and not self._root_tried and not self.costs.measured_size(1)):
                self._root_tried = True  # one one-token pass, to measure it
                self.explored += 1
                return 0
            return best
        self._root_only += 1
        if self.explore_every and self._root_only >= self.explore_every:
            # as if every size cost one token's pass: the largest tree that adds anything
            self._root_only = 0
            self.explored += 1
            k = min(m, self.explore_tokens)
            return int(np.count_nonzero(np.asarray(gains[:k]) > 0)) or 1
        return 0


def select_nodes(
    tree: DraftTree | Sequence[int],
    probs: Sequence[float],
    policy: BudgetPolicy,
    max_leaves: int | None = None,
    max_depth: int | None = None,
    overhead_s: float = 0.0,
) -> list[int]:
    """The nodes of a candidate trie to verify, best first.

    ``tree``: the candidate trie, or its parent list (node 0 is the root, parents precede
    children); ``probs[i]`` node i's estimated probability of being accepted, which must not
    exceed its parent's. Nodes are taken in order of probability from the root's frontier,
    skipping those that would pass ``max_depth`` or make more than ``max_leaves`` leaves
    (drafts); ``policy`` then keeps a prefix of that order. Every prefix is a subtree, and the
    leaf count never falls along the order, so the result respects both limits.
    """
    if not isinstance(tree, DraftTree):
        tree = DraftTree.from_parents(tree)
    parents, depth = tree.parents, tree.depths
    n = len(tree)
    cap = policy.max_tree_tokens - 1
    frontier = [(-float(probs[c]), c) for c in tree.children(0).values()]
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
        for g in tree.children(c).values():
            heapq.heappush(frontier, (-float(probs[g]), g))
    keep = policy.size([float(probs[c]) for c in order], overhead_s)
    return order[:keep]


_CALIBRATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_calibration(model, calibration: Calibration) -> None:
    """Make ``calibration`` the curve every later ``calibrated_budget(model)`` starts from, in
    place of the device's saved one, with no correction measured yet: how a replay models
    another device (``benchmarks/replay.py --cost``). Kept per model object, as the saved one
    is; ``calibrated_budget(..., refresh=True)`` goes back to the device's own."""
    param = next(model.parameters())
    _CALIBRATIONS[model] = ((str(param.device), param.dtype), calibration,
                            VerifyCost(calibration))


def calibrated_budget(model, tokenizer=None, fingerprint: str | None = None,
                      max_tree_tokens: int = 64, refresh: bool = False) -> CalibratedBudget:
    """The budget for ``model`` on its device: its saved calibration (``dresd calibrate``),
    measured and saved on first use. ``fingerprint`` (a store's records it) saves computing the
    model's; the calibration, and the costs the decoder measures on top of it, are kept in
    memory per model object, device and dtype, so every later call starts from the corrected
    curve."""
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
        cal = load_or_measure(model, fingerprint, refresh=refresh)
        cached = (key, cal, VerifyCost(cal))
        _CALIBRATIONS[model] = cached
    return CalibratedBudget(cached[1], max_tree_tokens, costs=cached[2])
