"""A draft: one continuation of the decided token ``y`` and how sure its source is of it.

The unit drafters propose (dresd.drafters) and draft trees merge (dresd.tree). It lives apart
from both so that each can import it without importing the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real


@dataclass(frozen=True)
class Draft:
    """A continuation of ``y``. ``score``: higher is likelier to be accepted, on the scale all
    sources share (about [-1, 1], 1 the surest; dresd.drafters.registry states the contract),
    which the composite's score bands assume; it must be a finite number."""

    tokens: tuple[int, ...]  # continuation after the decided token y
    score: float = 1.0
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.score, Real) or not math.isfinite(self.score):
            raise ValueError(f"draft score must be a finite number, got {self.score!r} "
                             f"(source {self.source or '?'})")
