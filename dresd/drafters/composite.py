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
so a band seen a few times already moves away from it: a source's score predicts how deep its
draft is right, so steps of high and of low scores need estimates of their own. ``share_s`` is
the fraction of s's rank-weighted drafts under the parent that go through the node. Sources
proposing the same node take the larger estimate, not a noisy OR: prompt lookup and the context
drafter often propose the same text, so their evidence is not independent and a noisy OR would
count it twice. The estimates under one parent are scaled to sum to at most 1. Finally the path
products at depth d are scaled by ``g(d)``, the right tokens at depth d of recent candidate
tries per token the raw estimates expected there (recent: the last fifty steps or so, since these
two pool every source's nodes; ``tree_decay``), and then by a reliability map: candidate nodes
are filed by that estimate into bins (``reliability_bins``), and each bin's estimate is scaled
by how many of its nodes were right per one it expected. ``g(d)`` gets each depth's total right
but not its split among branches (high estimates stay too high, low ones too low); the map
corrects the split. Once enough candidate nodes have been scored, an online logistic model
(dresd.drafters.node_model) takes over the final estimate: it reads, per node, each source's
share and share times hit rate, the best score and number of each source's drafts through the
node, the siblings and the raw conditional estimate above, and is fitted to the shadow scores of
nodes whose parent was right, so a node's estimate is the product of the model's conditionals
along its path. A node proposed only by sources being probed after a run of misses keeps its
hand-built conditional (the model's window remembers them from when they were right). So what
the policy maximises is calibrated against what was actually accepted. The budget policy
(dresd.budget) takes nodes best first and keeps as many as pay on this device, so the budget is
split by acceptance: a source that stops being right stops getting nodes. A source that misses
``mute_after`` steps in a row is asked only every ``probe_every`` steps, so it stops costing
retrieval time too.

Shadow scoring: every source's drafts, and every node of the candidate trie, are scored against
the tokens the model actually produced, whether or not they were verified (it costs no forward
pass). A step stays pending until the generated text reaches ``draft_len`` tokens past it, so a
draft that was never verified is still tested at every depth it guessed. (Steps are scored in
order and all at the same distance: a miss is known sooner than a hit, so scoring each step as
soon as its outcome is known would score hits after misses, and the decay, which weighs recent
steps more, would then inflate the estimates.) ``h_s``, ``g(d)`` and the reliability map all
learn from these scores, so nothing that stops getting budget stops learning: a source, or a
band of estimates, that was written off by a run of misses comes back as soon as its drafts
would be accepted. (Learning ``g`` and the map only from verified trees would lock a source out
for good: once its nodes are scaled below the point where the budget pays for them, no verified
tree can show that they have become right.) Estimates carried over to the next generation keep
``carry_over`` of their evidence, so old requests fade toward the prior.

The prior is optimistic enough to try (``prior_rate`` at depth 1, each deeper depth's prior the
estimate of the one above): with no evidence a source's best chain of drafts is worth verifying
on a CPU whose 8-token pass costs under twice a one-token pass; one step later the shadow scores
take over.

The composite hands the decoder the chosen subtree (``propose_tree``); ``propose`` gives the
same subtree as one draft per leaf, scored by its probability, so ``DraftTree.build`` of those
drafts is that tree node for node.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dresd.budget import BudgetPolicy, FixedBudget, select_nodes
from dresd.drafters.base import Draft, Drafter, DraftRequest
from dresd.drafters.candidates import (
    CandidateTrie,
    estimate_hand_built,
    feature_count,
    feature_rows,
    gather,
    path_products,
)
from dresd.drafters.node_model import NodeAcceptanceModel
from dresd.tree import DraftTree


@dataclass
class _PendingStep:
    """A step's guesses, kept until the generated text decides them (shadow scoring)."""

    y_index: int  # where y is in the sequence: the guesses are of the tokens after it
    guesses: list[list[tuple[int, ...]] | None]  # per source: its drafts' tokens, or None
    bands: list[int | None]  # per source: the score band of its best draft
    nodes: list[tuple[tuple[int, ...], float, float, int]] = field(default_factory=list)
    # ^ every candidate node: path below y, raw estimate, depth-calibrated estimate, its bin
    features: np.ndarray | None = None  # the node model's features, a row per node of nodes
    draft_len: int = 0  # the longest guess: the step is decided this many tokens after y
    accepted: int | None = None  # draft tokens the verified tree accepted

    @property
    def scored(self) -> list[int]:
        """The sources that offered something this step."""
        return [s for s, g in enumerate(self.guesses) if g]


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

    def carried_over(self, weight: float = 1.0) -> SourceStats:
        """A record for the next generation: the evidence goes on, weighed by ``weight`` (so
        the estimates move back toward their prior), and the counts start at 0."""
        bands = {b: r.carried_over(weight) for b, r in self.bands.items()}
        return SourceStats(self.name, self.hits * weight, self.tests * weight, bands=bands)


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
        carry_over: float = 0.5,
        tree_decay: float = 0.98,
        drafting_s: float | None = None,
        node_model: bool = True,
    ):
        """``drafters``: the sources; ``policy``: the tree budget (FixedBudget() by default);
        ``prior_rate`` / ``prior_strength``: the Beta prior of a source's hit rate per depth;
        ``decay``: weight of a source's counts at each new scored step (adapts within a
        generation);
        ``mute_after`` / ``probe_every``: steps of misses before a source is only asked every
        ``probe_every`` steps (0 never mutes);
        ``score_bands``: edges on a source's best draft score that file its steps into bands
        with their own hit rates (empty: one band); the edges are on the score scale every
        source shares (dresd.drafters.registry); ``band_strength``: the weight, in steps,
        of the pooled estimate as a band's prior;
        ``memory``: a dict, empty or another composite's, to keep the estimates in and carry
        them from one generation to the next across composites that share it (a composite of
        other sources starts over in it); without it the composite has a memory of its own,
        shared with nobody, and still carries its estimates over from one of its generations to
        the next;
        ``carry_over``: the weight the evidence of past generations keeps at each new one
        (1 keeps it whole, 0 starts every generation from the prior, the node model too; the
        node model keeps its window whole otherwise);
        ``tree_decay``: the weight of ``g(d)``'s and the reliability map's counts at each new
        scored step. They pool every candidate node of a step over all sources, so they follow
        the kind of text more than any one source's run of luck, and a map of nine bins fed
        ~10 steps (``decay``) had neighbouring bins' ratios swing between 0.2 and 2.3;
        ``drafting_s``: the drafting time per step the budget weighs against the verify cost;
        None (default) measures it, a fixed value makes the tree choices repeatable (replays);
        ``node_model``: estimate nodes with the online logistic model once it is fitted
        (dresd.drafters.node_model); False keeps the hand-built estimate alone."""
        if not drafters:
            raise ValueError("a composite needs at least one drafter")
        if not 0 < prior_rate < 1 or prior_strength <= 0:
            raise ValueError("prior_rate must be in (0, 1) and prior_strength > 0")
        if not 0 <= carry_over <= 1:
            raise ValueError(f"carry_over must be in [0, 1], got {carry_over}")
        if not 0 < decay <= 1 or not 0 < tree_decay <= 1:
            raise ValueError("decay and tree_decay must be in (0, 1]")
        if drafting_s is not None and not 0 <= drafting_s < float("inf"):
            raise ValueError(f"drafting_s must be None or a finite number >= 0, got {drafting_s}")
        self.drafting_s = drafting_s
        self.use_node_model = node_model
        self.carry_over = carry_over
        self.drafters = list(drafters)
        self.policy = policy or FixedBudget()
        self.prior_rate = prior_rate
        self.prior_strength = prior_strength
        self.decay = decay
        self.tree_decay = tree_decay
        self.mute_after = mute_after
        self.probe_every = max(1, probe_every)
        self.score_bands = np.sort(np.asarray(score_bands, np.float64))
        self.band_strength = band_strength
        self.memory = {} if memory is None else memory
        self.reliability_bins = np.sort(np.asarray(reliability_bins, np.float64))
        names = [d.name for d in self.drafters]
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self._pending: list[_PendingStep] = []
        self._seq: list[int] = []
        self._reset(carry=1.0)

    def _reset(self, carry: float) -> None:
        """A new generation: counters start at 0; the estimates go on from the last one with
        these sources, their evidence weighed by ``carry`` (a new generation of the same kind
        of text starts near where the last left off instead of at the prior, which
        overestimated the first ten steps' acceptance by half). The node model goes on whole
        (its window already weighs recent steps most) unless ``carry`` is 0, which starts it
        over too."""
        carried = self.memory.get("stats")
        model = self.memory.get("node_model")
        if carried is not None and [st.name for st in carried] == self.names:
            self.stats = [st.carried_over(carry) for st in carried]
            self.depth_fit = self.memory["depth_fit"].carried_over(carry)
        else:
            self.stats = [SourceStats(n) for n in self.names]
            self.depth_fit = SourceStats("tree")  # per depth: accepted vs estimated, decayed
            model = None  # other sources: the features mean other things
        if (not isinstance(model, NodeAcceptanceModel) or carry == 0
                or model.num_features != self.num_features):
            model = NodeAcceptanceModel(self.num_features)
        self.node_model = self.memory["node_model"] = model
        self.memory["stats"], self.memory["depth_fit"] = self.stats, self.depth_fit
        # per bin of a node's depth-calibrated estimate: accepted nodes and their estimates
        nbins = len(self.reliability_bins) + 1
        self.reliability = self.memory.setdefault("reliability", np.zeros((2, nbins)))
        if self.reliability.shape[1] != nbins:
            self.reliability = self.memory["reliability"] = np.zeros((2, nbins))
        self.reliability *= carry  # in place: the memory holds this array
        self._pending = []
        self._open: _PendingStep | None = None  # the step whose tree is being verified
        self.steps = 0
        self.tree_sizes: list[int] = []  # nodes below the root of each step's tree
        self.expected: list[float] = []  # each step's estimated accepted tokens
        self._overhead_s = self.drafting_s or 0.0

    # -- the drafter protocol ------------------------------------------------------------------

    def begin(self, prompt_tokens, prompt_hidden) -> None:
        self._settle(self._seq, final=True)  # the last generation's steps, on what it produced
        self._reset(self.carry_over)
        self._seq = [int(t) for t in prompt_tokens]
        for d in self.drafters:
            d.begin(prompt_tokens, prompt_hidden)

    def accept(self, tokens, hidden) -> None:
        for d in self.drafters:
            d.accept(tokens, hidden)
        self._seq.extend(int(t) for t in tokens)
        if self._open is not None:
            self._open.accepted = len(tokens) - 1
            self._open = None

    def verified(self, tree_tokens: int, seconds: float) -> None:
        self.policy.observe(tree_tokens, seconds)

    def propose(self, request: DraftRequest) -> list[Draft]:
        """One draft per leaf of the chosen subtree, likeliest first, scored by its estimate."""
        return [Draft(path, prob, src) for path, prob, src in self._step(request)]

    def propose_tree(self, request: DraftRequest, budget, vocab_size: int | None = None):
        """The chosen subtree itself: its leaves' paths inserted likeliest first, so node order
        matches what merging ``propose``'s drafts would give (``budget`` cuts nothing when the
        policy's cap is within it: the request already carries the drafts and depth limits)."""
        leaves = self._step(request)
        return DraftTree.from_paths(request.tokens[-1], [(p, src) for p, _, src in leaves],
                                    budget, vocab_size)

    def _step(self, request: DraftRequest) -> list[tuple[tuple[int, ...], float, str]]:
        """Ask the sources, plan this step's tree and keep the step for shadow scoring; the
        chosen leaves as (path below y, estimate, sources)."""
        t0 = time.perf_counter()
        self._settle(request.tokens)  # the committed tokens (``_seq``, kept by accept) and y
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
        step = _PendingStep(
            y_index=len(request.tokens) - 1,
            guesses=[None if not p else [tuple(int(t) for t in x.tokens[: request.draft_len])
                                         for x in p] for p in proposals],
            bands=[self.band(p) for p in proposals],
            draft_len=request.draft_len,
        )
        out = self._plan(proposals, request, step)
        self._pending.append(step)
        self._open = step
        dt = time.perf_counter() - t0 if self.drafting_s is None else self.drafting_s
        self._overhead_s = dt if self.steps == 1 else 0.8 * self._overhead_s + 0.2 * dt
        return out

    # -- estimates -----------------------------------------------------------------------------

    def _muting(self, st: SourceStats) -> bool:
        """The source missed ``mute_after`` steps in a row: it is only probed."""
        return self.mute_after > 0 and st.misses_in_a_row >= self.mute_after

    def _muted(self, st: SourceStats) -> bool:
        return self._muting(st) and self.steps % self.probe_every != 0

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

    def _settle(self, known: Sequence[int], final: bool = False) -> None:
        """Score what the text generated so far (``known``) decides of the pending steps; with
        ``final`` the generation is over and what it did not reach stays untested."""
        done = 0
        for step in self._pending:  # in step order, so the decay weighs them in that order
            start = step.y_index + 1
            truth = tuple(known[start : start + step.draft_len])
            if not final and len(truth) < step.draft_len:
                break
            for s in step.scored:
                self._score_source(s, step, truth)
            self._score_tree(step, truth)
            done += 1
        del self._pending[:done]

    def _score_source(self, s: int, step: _PendingStep, truth: tuple[int, ...]) -> None:
        """Source s's test: per depth, whether one of its drafts still right so far had the
        model's token (the list stops at the first miss)."""
        if not truth:
            return
        alive = step.guesses[s]
        depth_hit: list[bool] = []
        for d, tok in enumerate(truth):
            alive = [x for x in alive if len(x) > d]
            if not alive:
                break
            alive = [x for x in alive if x[d] == tok]
            depth_hit.append(bool(alive))
            if not alive:
                break
        st = self.stats[s]
        st.record(depth_hit, self.decay, band=step.bands[s])
        right = sum(depth_hit)
        st.predicted += right
        st.accepted += min(right, step.accepted or 0)
        st.misses_in_a_row = 0 if right else st.misses_in_a_row + 1

    def _score_tree(self, step: _PendingStep, truth: tuple[int, ...]) -> None:
        """Every candidate node, verified or not, against the text: per depth the raw estimates
        against whether the text's prefix was a candidate there (``g``), per reliability bin the
        depth-calibrated estimates against the nodes that were right (the map)."""
        nodes = [n for n in step.nodes if len(n[0]) <= len(truth)]  # decided ones
        if not nodes:
            return
        depth = max(len(n[0]) for n in nodes)
        estimated = np.zeros(depth)
        hits = [False] * depth
        self.reliability *= self.tree_decay
        for path, raw, before, b in nodes:
            right = path == truth[: len(path)]
            estimated[len(path) - 1] += raw
            hits[len(path) - 1] |= right
            self.reliability[0, b] += right
            self.reliability[1, b] += before
        self.depth_fit.record(hits, self.tree_decay, estimated.tolist())
        if step.features is not None:
            # the node model's examples: decided nodes whose parent was right, and whether the
            # node was too (a path's probability is the product of these conditionals)
            rows, labels = [], []
            for i, (path, *_rest) in enumerate(step.nodes):
                if len(path) <= len(truth) and path[:-1] == truth[: len(path) - 1]:
                    rows.append(i)
                    labels.append(path[-1] == truth[len(path) - 1])
            if rows:
                self.node_model.add(step.features[rows], np.asarray(labels, np.float64))

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

    def _plan(self, proposals: list[list[Draft] | None], request: DraftRequest,
              step: _PendingStep) -> list[tuple[tuple[int, ...], float, str]]:
        """Merge the proposals into a candidate trie, estimate each node, let the policy choose,
        and return the leaves of the chosen subtree, likeliest first."""
        trie = gather(proposals, request.tokens[-1], request.draft_len)
        if len(trie) == 1:
            self.tree_sizes.append(0)
            self.expected.append(0.0)
            return []
        probs = self._estimate_nodes(trie, proposals, step, request.draft_len)
        chosen = select_nodes(trie.tree, probs, self.policy, max_leaves=request.num_drafts,
                              max_depth=request.draft_len, overhead_s=self._overhead_s)
        paths = trie.tree.token_paths()
        step.nodes = [(paths[c], node.raw, node.calibrated, node.bin)
                      for c, node in enumerate(trie.nodes) if c]
        self.tree_sizes.append(len(chosen))
        self.expected.append(sum(probs[c] for c in chosen))
        for c in chosen:
            for s in trie.nodes[c].weight:
                self.stats[s].tree_nodes += 1
        has_child = {trie.tree.parents[c] for c in chosen}
        leaves = [(paths[c], float(probs[c]),
                   "+".join(self.names[s] for s in sorted(trie.nodes[c].weight)))
                  for c in chosen if c not in has_child]
        leaves.sort(key=lambda x: -x[1])  # stable: ties keep the policy's order
        return leaves

    @property
    def num_features(self) -> int:
        """The node model's features (dresd.drafters.candidates.feature_count lists them)."""
        return feature_count(len(self.drafters))

    def _estimate_nodes(self, trie: CandidateTrie, proposals: list[list[Draft] | None],
                        step: _PendingStep, max_depth: int) -> list[float]:
        """Per node of ``trie``, its estimated probability of being accepted: the root's 1, and
        never above the parent's. The hand-built estimate (``trie``'s nodes keep each of its
        stages), or, once the node model is fitted, the path products of its conditionals.
        ``step`` keeps the model's features (None without the model: nothing built or
        learned)."""
        rates = [self.hit_rates(s, max_depth, step.bands[s]).tolist() if p else None
                 for s, p in enumerate(proposals)]
        estimate_hand_built(trie, rates, [1.0] + self.calibration(max_depth).tolist(),
                            self.reliability_bins, self.reliability_ratios())
        hand_built = [node.prob for node in trie.nodes]
        if not self.use_node_model:
            return hand_built
        step.features = feature_rows(trie, rates, len(self.drafters))
        learned = self._learned_conditionals(trie, step.features)
        return hand_built if learned is None else path_products(trie.tree, learned)

    def _learned_conditionals(self, trie: CandidateTrie,
                              features: np.ndarray) -> np.ndarray | None:
        """Per node, the node model's probability that it is accepted given its parent is (the
        root's 1); None until the model is fitted. A node proposed only by sources being probed
        after a run of misses keeps its hand-built conditional: such a source is judged by its
        own recent record, while the model's window still remembers it from when it was
        right."""
        learned = self.node_model.predict(features)
        if learned is None:
            return None
        conditional = np.concatenate([[1.0], learned])
        probing = {s for s, st in enumerate(self.stats) if self._muting(st)}
        for c in range(1, len(trie)):
            node = trie.nodes[c]
            if probing.issuperset(node.weight):
                parent = trie.nodes[trie.tree.parents[c]].prob
                conditional[c] = node.prob / parent if parent > 0 else 0.0
        return conditional

    # -- reporting -----------------------------------------------------------------------------

    def open_candidates(self) -> list[tuple[int, ...]] | None:
        """Paths below ``y`` of every candidate node of the step being verified (between
        ``propose_tree`` and ``accept``), chosen or not; None when no step is open."""
        return None if self._open is None else [n[0] for n in self._open.nodes]

    def settle(self) -> None:
        """Score the steps of the generation that just ended on what it produced (``begin``
        does it for the previous generation; call it to read ``source_summary`` first)."""
        self._settle(self._seq, final=True)

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
