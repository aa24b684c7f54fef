"""The composite drafter: several sources feed one token tree, sized by a budget policy.

Each step every (unmuted) source proposes its drafts for y. They are merged into one candidate
trie (shared prefixes become one node) and every node gets an estimated probability of being
accepted: its parent's, times

    q(node) = max_s h_s(depth) * share_s(node)

where ``h_s(d)`` is how often, over recent steps, source s's drafts that were still right at
depth d - 1 had the model's token at depth d among them (a Beta prior, so a new source gets
tried, and the prior of depth d is the estimate at depth d - 1, so rarely reached depths follow
the ones that are measured; each scored step weighs ``decay`` times the one after it, so the
estimate follows the last ten or so steps, carried over from one generation to the next). The
drafts' own scores sharpen it: steps are also filed by the score band of the source's best draft
(``score_bands``: a dense draft's cosine similarity, prompt lookup's match length), and
``h_s(d)`` is the estimate of the current band, with the source's pooled estimate as its prior,
so a band seen a few times already moves away from it. (Measured on HumanEval with the default
model: the context drafter's steps whose best similarity is in the top quarter were right 4.5
tokens deep on average, those in the bottom quarter 0.4.) ``share_s`` is the fraction of s's
rank-weighted drafts under the parent that go through the node. Sources proposing the same node
take the larger estimate, not a noisy OR: prompt lookup and the context drafter often propose
the same text, and counting them as independent evidence doubled the estimates. The estimates
under one parent are scaled to sum to at most 1. Finally the path products at depth d are
scaled by ``g(d)``, the accepted tokens at depth d of recent verified trees per token the raw
estimates expected there, and then by a reliability map: verified nodes are filed by that
estimate into bins (``reliability_bins``), and each bin's estimate is scaled by how many of its
nodes were accepted per one it expected. ``g(d)`` gets each depth's total right but not its
split among branches (steps estimated at 5 or more tokens got 20% fewer, those at under 0.3
twice as many); the map corrects the split. So what the policy maximises is calibrated against
what was actually accepted. The budget policy (dresd.budget) takes nodes best first and keeps
as many as pay on this device, so the budget is split by acceptance: a source that stops being
right stops getting nodes. A source that misses ``mute_after`` steps in a row is asked only
every ``probe_every`` steps, so it stops costing retrieval time too.

Every source is scored against the model's actual tokens (the accepted ones and the one the
model chose after them) whether or not its drafts made it into the tree, so a source's estimate
keeps learning even while it gets no budget.

The composite returns one draft per leaf of the chosen subtree, scored by its probability, so
``DraftTree.build`` rebuilds exactly that subtree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dresd.budget import BudgetPolicy, FixedBudget, select_nodes
from dresd.drafters.base import Draft, Drafter, DraftRequest


@dataclass
class SourceStats:
    """One source's record in the current generation."""

    name: str
    hits: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per depth, decayed
    tests: np.ndarray = field(default_factory=lambda: np.zeros(0))
    misses_in_a_row: int = 0
    calls: int = 0
    drafts: int = 0
    tree_nodes: int = 0  # nodes of verified trees this source proposed
    accepted: int = 0  # accepted tokens this source had proposed
    predicted: int = 0  # model tokens (accepted or the one after) this source had proposed
    seconds: float = 0.0
    bands: dict[int, SourceStats] = field(default_factory=dict)  # score band -> its record

    def record(self, depth_hit: list[bool], decay: float,
               weights: list[float] | None = None, band: int | None = None) -> None:
        """One step's test: ``depth_hit[d]`` is whether the source was right at depth d + 1,
        given it was right before; the list stops at the first miss. A test counts 1, or
        ``weights[d]`` (for the merged candidates: their estimated mass). With ``band`` (the
        score band of the step's best draft) the band's own record is updated too."""
        n = len(depth_hit)
        if n > len(self.tests):
            self.hits = np.pad(self.hits, (0, n - len(self.hits)))
            self.tests = np.pad(self.tests, (0, n - len(self.tests)))
        self.hits *= decay
        self.tests *= decay
        self.tests[:n] += 1 if weights is None else np.asarray(weights, np.float64)
        self.hits[:n] += np.asarray(depth_hit, np.float64)
        if band is not None:
            self.bands.setdefault(band, SourceStats(f"{self.name}@{band}")).record(
                depth_hit, decay, weights)

    def carried_over(self) -> SourceStats:
        """A record for the next generation: the estimates go on, the counts start at 0."""
        return SourceStats(self.name, self.hits, self.tests, bands=self.bands)


class CompositeDrafter(Drafter):
    name = "composite"

    def __init__(
        self,
        drafters: Sequence[Drafter],
        policy: BudgetPolicy | None = None,
        prior_rate: float = 0.5,
        prior_strength: float = 2.0,
        decay: float = 0.9,
        mute_after: int = 16,
        probe_every: int = 8,
        score_bands: Sequence[float] = (0.6, 0.75, 0.9),
        band_strength: float = 2.0,
        memory: dict | None = None,
        reliability_bins: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9),
    ):
        """``drafters``: the sources; ``policy``: the tree budget (FixedBudget() by default);
        ``prior_rate`` / ``prior_strength``: the Beta prior of a source's hit rate per depth;
        ``decay``: weight of a source's counts at each new scored step (adapts within a
        generation);
        ``mute_after`` / ``probe_every``: steps of misses before a source is only asked every
        ``probe_every`` steps (0 never mutes);
        ``score_bands``: edges on a source's best draft score that file its steps into bands
        with their own hit rates (empty: one band); ``band_strength``: the weight, in steps,
        of the pooled estimate as a band's prior;
        ``memory``: a dict that keeps the estimates from one generation to the next, also
        across composites (``dresd.generate`` passes one per model and configuration); without
        it a composite still carries its own estimates over from one generation to the next."""
        if not drafters:
            raise ValueError("a composite needs at least one drafter")
        if not 0 < prior_rate < 1 or prior_strength <= 0:
            raise ValueError("prior_rate must be in (0, 1) and prior_strength > 0")
        self.drafters = list(drafters)
        self.policy = policy or FixedBudget()
        self.prior_rate = prior_rate
        self.prior_strength = prior_strength
        self.decay = decay
        self.mute_after = mute_after
        self.probe_every = max(1, probe_every)
        self.score_bands = np.sort(np.asarray(score_bands, np.float64))
        self.band_strength = band_strength
        self.memory = {} if memory is None else memory
        self.reliability_bins = np.sort(np.asarray(reliability_bins, np.float64))
        names = [d.name for d in self.drafters]
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self._reset()

    def _reset(self) -> None:
        """A new generation: counters start at 0; the estimates go on from the last one with
        these sources (a new generation of the same kind of text starts where the last left
        off instead of at the prior, which overestimated the first ten steps' acceptance by
        half)."""
        carried = self.memory.get("stats")
        if carried is not None and [st.name for st in carried] == self.names:
            self.stats = [st.carried_over() for st in carried]
            self.depth_fit = self.memory["depth_fit"].carried_over()
        else:
            self.stats = [SourceStats(n) for n in self.names]
            self.depth_fit = SourceStats("tree")  # per depth: accepted vs estimated, decayed
        self.memory["stats"], self.memory["depth_fit"] = self.stats, self.depth_fit
        # per bin of a node's depth-calibrated estimate: accepted nodes and their estimates
        nbins = len(self.reliability_bins) + 1
        self.reliability = self.memory.setdefault("reliability", np.zeros((2, nbins)))
        if self.reliability.shape[1] != nbins:
            self.reliability = self.memory["reliability"] = np.zeros((2, nbins))
        self._verified: list[tuple[int, float, tuple[int, ...]]] = []
        self._estimated: list[float] | None = None  # last tree's raw estimate per depth
        self.steps = 0
        self.tree_sizes: list[int] = []  # nodes below the root of each step's tree
        self.expected: list[float] = []  # each step's estimated accepted tokens
        self._last: list[list[Draft] | None] = [None] * len(self.drafters)
        self._last_bands: list[int | None] = [None] * len(self.drafters)
        self._last_accepted: list[int] | None = None
        self._overhead_s = 0.0

    # -- the drafter protocol ------------------------------------------------------------------

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self._reset()
        for d in self.drafters:
            d.begin(prompt_tokens, prompt_hidden)

    def accept(self, tokens, hidden) -> None:
        for d in self.drafters:
            d.accept(tokens, hidden)
        if self._last_accepted is not None:  # a step without drafting came in between
            self._score_last_step(self._last_accepted + [int(tokens[0])])
        self._last_accepted = [int(t) for t in tokens[1:]]

    def propose(self, request: DraftRequest) -> list[Draft]:
        t0 = time.perf_counter()
        if self._last_accepted is not None:
            self._score_last_step(self._last_accepted + [int(request.tokens[-1])])
            self._last_accepted = None
        self.steps += 1
        proposals: list[list[Draft] | None] = []
        for i, d in enumerate(self.drafters):
            st = self.stats[i]
            if self._muted(st):
                proposals.append(None)
                continue
            t = time.perf_counter()
            drafts = [x for x in d.propose(request) if x.tokens][: request.num_drafts]
            st.seconds += time.perf_counter() - t
            st.calls += 1
            st.drafts += len(drafts)
            proposals.append(drafts)
        self._last = proposals
        self._last_bands = [self.band(p) for p in proposals]
        out = self._plan(proposals, request)
        dt = time.perf_counter() - t0
        self._overhead_s = dt if self.steps == 1 else 0.8 * self._overhead_s + 0.2 * dt
        return out

    # -- estimates -----------------------------------------------------------------------------

    def _muted(self, st: SourceStats) -> bool:
        return (self.mute_after > 0 and st.misses_in_a_row >= self.mute_after
                and self.steps % self.probe_every != 0)

    def band(self, drafts: list[Draft] | None) -> int | None:
        """The score band of a proposal: where its best draft's score falls among the edges."""
        if not drafts:
            return None
        return int(np.searchsorted(self.score_bands, max(x.score for x in drafts), "right"))

    def hit_rates(self, i: int, depth: int, band: int | None = None) -> np.ndarray:
        """Source i's estimated conditional hit rate at depths 1..depth; with ``band``, for a
        proposal in that score band."""
        st = self.stats[i]
        pooled = self._estimate(st, depth, self.prior_rate, self.prior_strength)
        record = st.bands.get(band) if band is not None else None
        if record is None:
            return pooled
        return self._estimate(record, depth, pooled, self.band_strength)

    @staticmethod
    def _estimate(st: SourceStats, depth: int, prior, k: float) -> np.ndarray:
        """Per-depth posterior means of hits per test (prior weight ``k``). ``prior`` is the
        prior of depth 1, whose estimate is the prior of depth 2 and so on, so depths seldom
        reached follow the ones that are; or one prior per depth."""
        out = np.empty(depth)
        m = len(st.tests)
        per_depth = np.ndim(prior) > 0
        for d in range(depth):
            hits, tests = (st.hits[d], st.tests[d]) if d < m else (0.0, 0.0)
            p = prior[d] if per_depth else prior
            out[d] = (hits + k * p) / (tests + k)
            if not per_depth:
                prior = out[d]
        return out

    def _score_last_step(self, truth: list[int]) -> None:
        """Score every source's last drafts against the model's tokens after y."""
        for i, drafts in enumerate(self._last):
            if not drafts:  # not asked, or nothing to offer: no test, no cost
                continue
            st = self.stats[i]
            alive = drafts
            depth_hit: list[bool] = []
            for d, tok in enumerate(truth):
                alive = [x for x in alive if len(x.tokens) > d]
                if not alive:
                    break
                alive = [x for x in alive if x.tokens[d] == tok]
                depth_hit.append(bool(alive))
                if not alive:
                    break
            st.record(depth_hit, self.decay, band=self._last_bands[i])
            right = sum(depth_hit)
            st.predicted += right
            st.accepted += min(right, len(truth) - 1)
            st.misses_in_a_row = 0 if right else st.misses_in_a_row + 1
        self._last = [None] * len(self.drafters)
        if self._estimated:  # the verified tree: one accepted node per depth up to len - 1
            accepted = len(truth) - 1
            hits = [d < accepted for d in range(len(self._estimated))]
            self.depth_fit.record(hits, self.decay, self._estimated)
        self._estimated = None
        if self._verified:
            got = tuple(truth[:-1])  # the accepted path
            self.reliability *= self.decay
            for b, p, path in self._verified:
                self.reliability[0, b] += got[: len(path)] == path
                self.reliability[1, b] += p
        self._verified = []

    def reliability_ratios(self) -> np.ndarray:
        """Per bin of depth-calibrated node estimates: accepted nodes per expected one, over
        recent verified trees (a prior of one expected token at ratio 1)."""
        return (self.reliability[0] + 1.0) / (self.reliability[1] + 1.0)

    def calibration(self, depth: int) -> np.ndarray:
        """g(1..depth): accepted tokens at each depth of the verified trees per token the raw
        estimates expected there, over recent steps (1 until there is evidence)."""
        # The prior weighs half a token: a deep level expects a small fraction of a token per
        # step, so a heavier prior would hide what the verified trees show.
        return self._estimate(self.depth_fit, depth, 1.0, 0.5)

    # -- the tree ------------------------------------------------------------------------------

    def _plan(self, proposals: list[list[Draft] | None], request: DraftRequest) -> list[Draft]:
        """Merge the proposals into a candidate trie, estimate each node, let the policy choose,
        and return one draft per leaf of the chosen subtree."""
        parents, tokens = [-1], [int(request.tokens[-1])]
        children: list[dict[int, int]] = [{}]
        mass: list[dict[int, float]] = [{}]  # node -> source -> rank weight through the node
        for s, drafts in enumerate(proposals):
            ranked = sorted(drafts or (), key=lambda x: -x.score)
            for rank, draft in enumerate(ranked):
                w = 1.0 / (rank + 1)
                node = 0
                for t in draft.tokens[: request.draft_len]:
                    t = int(t)
                    nxt = children[node].get(t)
                    if nxt is None:
                        nxt = len(tokens)
                        children[node][t] = nxt
                        parents.append(node)
                        tokens.append(t)
                        children.append({})
                        mass.append({})
                    node = nxt
                    mass[node][s] = mass[node].get(s, 0.0) + w
        n = len(tokens)
        if n == 1:
            self.tree_sizes.append(0)
            self.expected.append(0.0)
            return []
        max_depth = request.draft_len
        rates = [self.hit_rates(s, max_depth, self._last_bands[s]).tolist() if p else None
                 for s, p in enumerate(proposals)]
        calib = [1.0] + self.calibration(max_depth).tolist()
        raw = [1.0] * n  # products of the sources' conditional estimates
        probs = [1.0] * n  # raw, scaled by g(d) and the reliability map, never above the parent
        depth = [0] * n
        ratios = self.reliability_ratios()
        bins = [0] * n
        before = [1.0] * n  # estimates before the reliability scaling
        for node in range(n):  # parents precede children
            kids = list(children[node].values())
            if not kids:
                continue
            below: dict[int, float] = {}  # source -> its mass continuing below this node
            for c in kids:
                for s, w in mass[c].items():
                    below[s] = below.get(s, 0.0) + w
            d = depth[node] + 1
            q = []
            for c in kids:
                q.append(max(rates[s][d - 1] * w / below[s] for s, w in mass[c].items()))
            scale = raw[node] / max(1.0, sum(q))  # the model picks one token: sum(q) <= 1
            for c, qc in zip(kids, q):
                raw[c] = qc * scale
                before[c] = min(before[node], raw[c] * calib[d])
                bins[c] = int(np.searchsorted(self.reliability_bins, before[c], "right"))
                probs[c] = min(probs[node], before[c] * ratios[bins[c]])
                depth[c] = d
        chosen = select_nodes(parents, probs, self.policy, max_leaves=request.num_drafts,
                              max_depth=max_depth, overhead_s=self._overhead_s)
        estimated = [0.0] * (max((depth[c] for c in chosen), default=0))
        for c in chosen:
            estimated[depth[c] - 1] += raw[c]
        self._estimated = estimated
        path_to: dict[int, tuple[int, ...]] = {0: ()}  # chosen nodes follow their parents
        for c in chosen:
            path_to[c] = path_to[parents[c]] + (tokens[c],)
        self._verified = [(bins[c], before[c], path_to[c]) for c in chosen]
        self.tree_sizes.append(len(chosen))
        self.expected.append(sum(probs[c] for c in chosen))
        for c in chosen:
            for s in mass[c]:
                self.stats[s].tree_nodes += 1
        has_child = {parents[c] for c in chosen}
        drafts = []
        for leaf in chosen:
            if leaf in has_child:
                continue
            src = "+".join(self.names[s] for s in sorted(mass[leaf]))
            drafts.append(Draft(path_to[leaf], float(probs[leaf]), src))
        drafts.sort(key=lambda x: -x.score)
        return drafts

    # -- reporting -----------------------------------------------------------------------------

    def source_summary(self) -> dict[str, dict]:
        """Per source: calls, drafts, tree nodes, accepted tokens and pooled hit rate."""
        out = {}
        for i, st in enumerate(self.stats):
            out[st.name] = dict(
                calls=st.calls, drafts=st.drafts, tree_nodes=st.tree_nodes,
                accepted=st.accepted, predicted=st.predicted, seconds=st.seconds,
                hit_rate=float(self.hit_rates(i, 1)[0]),
            )
        return out
