"""Target distributions and lossless acceptance of draft-tree tokens.

Greedy: the next token at a node is the argmax of its logits; a child is accepted when it equals
it. Sampling: the node's distribution ``p`` is the warped softmax (temperature, then top-k, then
top-p, as transformers' warpers do), and drafts are deterministic, so at a node with children
c1..cm the decoder runs multi-candidate rejection: accept c_i with probability r(c_i) under the
current residual r (initially p); on rejection set r(c_i) = 0 and renormalise; if every child is
rejected, sample from the residual. Each token then leaves the node with probability exactly
p(token): this is sampling from p without replacement, stopped at the first draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A tiny temperature overflows logits / temperature in float32 (1e-40 gives inf and NaN
# probabilities); at 0.01 sampling is already greedy in all but name, so below it ask for 0.
# Far above the maximum the distribution is uniform to float precision.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e4


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables

    def __post_init__(self):
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and "
                             f"{MAX_TEMPERATURE:g}, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits [..., V]; removed entries become -inf."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        # Same rule as transformers' TopPLogitsWarper: drop the low tail whose mass is
        # <= 1 - top_p, always keeping the most likely token.
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return x


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from, [..., V] float32."""
    return warp_logits(logits, params).softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from a 1-D distribution, using a CPU generator so runs repeat on any device."""
    return int(torch.multinomial(probs.detach().to("cpu", torch.float64), 1, generator=generator))


def accept_among_children(
    probs: torch.Tensor, children: Sequence[int], generator: torch.Generator
) -> tuple[int, bool]:
    """Multi-candidate rejection for deterministic drafts at one tree node.

    Returns (token, accepted): the child accepted, or a token sampled from the residual
    distribution once every child is rejected. The token is distributed exactly as ``probs``.
    """
    residual = probs.detach().to("cpu", torch.float64).clone()
    for c in children:
        mass = float(residual.sum())
        if mass <= 0:
            break
        q = float(residual[c]) / mass
        if q > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < q:
            return int(c), True
        residual[c] = 0.0
    if float(residual.sum()) <= 0:
        # Every token with mass was a rejected child; unreachable for a proper distribution
        # (the child accepted with probability 1 would have been taken), kept for float safety.
        return int(torch.argmax(probs).item()), False
    return int(torch.multinomial(residual, 1, generator=generator)), False
