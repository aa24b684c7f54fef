"""An online logistic model of a candidate node's acceptance, given that its parent is accepted.

The composite's hand-built estimate of a node (a source's hit rate at the node's depth, times the
share of the source's drafts through it, rescaled per depth and per estimate bin) uses one
source's evidence at a time and ignores most of what a step knows about the node: how many drafts
of each source pass through it, their scores, how many siblings compete with it. This model reads
all of that (``CompositeDrafter.num_features`` lists it) and is fitted to the composite's shadow
scores: every decided candidate node whose parent was right is one example, labelled by whether
the node was right too. The path product of its predictions is then a node's probability of
being accepted, which is what the budget ranks and sizes trees by.

Its weights are fitted online, from this process's own steps, so it learns the kind of text it
is used on: a ring of the last ``capacity`` examples, each weighed ``decay`` per scored step since
its own (a memory of about a hundred steps, as the composite's other estimates follow recent
text), refitted every ``refit_every`` scored steps by a few damped Newton steps of L2-regularised
logistic regression on standardised features, warm-started from the last fit. Until it has
``min_examples`` examples it predicts nothing and the composite keeps its hand-built estimate
(whose raw conditional is one of the features, so the model can lean on it and learn what to
correct). (The
features and these settings were chosen on replay logs: benchmarks/RESULTS.md, 2026-12-01,
"node model".)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(eq=False)  # two models with the same settings are not the same model
class NodeAcceptanceModel:
    num_features: int
    capacity: int = 8192  # examples held: about 800 steps of ~10 decided nodes
    min_examples: int = 256  # no prediction before this many (and a first fit)
    refit_every: int = 8  # scored steps between fits
    ridge: float = 1.0  # L2 penalty on the standardised weights, in examples' worth
    newton_steps: int = 3  # per fit, warm-started
    decay: float = 0.99  # an example's weight per scored step since its own
    max_step: float = 4.0  # largest change of one weight in a Newton step, in logits
    # standardised features are clipped to +-max_z: a value rare in the window (a source that
    # seldom proposes) would stand hundreds of standard deviations out, and the fit would
    # extrapolate from a few old examples to near-certainty
    max_z: float = 4.0

    def __post_init__(self):
        if min(self.num_features, self.capacity, self.min_examples, self.refit_every,
               self.newton_steps) < 1:
            raise ValueError("num_features, capacity, min_examples, refit_every and "
                             "newton_steps must be >= 1")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0 (it keeps the fit finite), got {self.ridge}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if not self.max_step > 0 or not self.max_z > 0:
            raise ValueError(f"max_step and max_z must be > 0, got {self.max_step}, "
                             f"{self.max_z}")
        self._x = np.zeros((self.capacity, self.num_features), np.float64)
        self._y = np.zeros(self.capacity, np.float64)
        self._step = np.zeros(self.capacity, np.float64)  # the scored step of each example
        self.steps = 0  # scored steps added
        self._next = 0  # ring position of the next example
        self.examples = 0  # examples held (at most capacity)
        self._since_fit = 0  # scored steps since the last fit
        self.fits = 0
        self._mean = np.zeros(self.num_features)
        self._scale = np.ones(self.num_features)
        self._weights: np.ndarray | None = None  # intercept first, then one per feature

    @property
    def fitted(self) -> bool:
        return self._weights is not None

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        """One scored step's examples: ``features`` [n, F], ``labels`` [n] (1: the node was
        right). Refits when ``refit_every`` steps have been added since the last fit."""
        features = np.asarray(features, np.float64).reshape(-1, self.num_features)
        labels = np.asarray(labels, np.float64).reshape(-1)
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        features, labels = features[-self.capacity:], labels[-self.capacity:]
        rows = (self._next + np.arange(len(labels))) % self.capacity
        self._x[rows], self._y[rows], self._step[rows] = features, labels, self.steps
        self.steps += 1
        self._next = (self._next + len(labels)) % self.capacity
        self.examples = min(self.capacity, self.examples + len(labels))
        self._since_fit += 1
        if self.examples >= self.min_examples and (self._since_fit >= self.refit_every
                                                   or not self.fitted):
            self.fit()

    def fit(self) -> None:
        """Newton steps on the held examples (L2 penalty ``ridge`` on every weight), from the
        last weights. In torch, not numpy: numpy's OpenBLAS threads spin after a product this
        size and starve the model's forward pass on a small CPU (the same reason as
        dresd.search._single_threaded); torch's products share the model's pool."""
        if self.examples == 0:
            return
        x = torch.from_numpy(self._x[: self.examples])
        y = torch.from_numpy(self._y[: self.examples])
        # each example weighs ``decay`` per scored step since its own, so the fit follows the
        # kind of text the process sees now, as the composite's other estimates do
        age = torch.from_numpy(self.steps - 1 - self._step[: self.examples])
        v = self.decay ** age
        evidence = float(v.sum())  # examples' worth of weight
        v = v / evidence
        mean = v @ x
        scale = (v @ (x - mean) ** 2).sqrt()
        scale[scale < 1e-9] = 1.0  # a constant feature carries no information
        z = torch.cat([torch.ones(len(x), 1, dtype=x.dtype),
                       ((x - mean) / scale).clamp(-self.max_z, self.max_z)], dim=1)
        # warm start: the last fit's weights, though its mean and scale were a little different
        # (the damped steps absorb that)
        w = (torch.zeros(z.shape[1], dtype=x.dtype) if self._weights is None
             else torch.from_numpy(self._weights.copy()))
        # v sums to 1, so the penalty is ``ridge`` over the evidence's worth in examples; it
        # holds the intercept too, which keeps the fit finite when the examples are separable
        penalty = torch.full((z.shape[1],), self.ridge / evidence, dtype=x.dtype)
        for _ in range(self.newton_steps):
            p = torch.sigmoid(z @ w)
            grad = z.T @ (v * (p - y)) + penalty * w
            hess = (z * (v * p * (1 - p))[:, None]).T @ z + torch.diag(penalty)
            step = torch.linalg.solve(hess, grad)
            # a damped step: Newton overshoots where p(1 - p) is nearly 0 (separable examples)
            w = w - step * min(1.0, self.max_step / max(float(step.abs().max()), 1e-12))
        if not torch.isfinite(w).all():  # never warm-start from NaN: start over next time
            self._weights = None
            return
        self._mean, self._scale, self._weights = mean.numpy(), scale.numpy(), w.numpy()
        self._since_fit = 0
        self.fits += 1

    def predict(self, features: np.ndarray) -> np.ndarray | None:
        """P(node right | parent right) per row of ``features``, or None before the first fit."""
        if self._weights is None:
            return None
        z = np.clip((np.asarray(features, np.float64) - self._mean) / self._scale,
                    -self.max_z, self.max_z)
        # a sum of products, not ``z @ w``: no BLAS call, whose threads would spin (see fit)
        return _sigmoid(self._weights[0] + (z * self._weights[1:]).sum(axis=1))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow for large |v|
