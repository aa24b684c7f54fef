"""What one generation reports: its tokens and text, and the counts and times of its steps.

- ``steps``: verify forwards (the prefill forward, which decides the first token, is not a step).
- AL (accepted length): tokens emitted by verify steps / steps, i.e. mean of accepted + 1.
- AR (acceptance rate): accepted draft tokens / draft tokens proposed on the verified path, where
  the verified path of a step is the longest draft through the accepted nodes (accepted depth +
  the longest branch below the last accepted node). A step with no drafts proposes 0 tokens.
- TPS: new tokens / total wall time (prefill included).
- ``drafting_s``: wall time inside the drafter (``begin``, ``propose`` with its retrieval and
  tree planning, the tree's merge, ``accept``, ``verified``); ``verify_s``: the verify passes
  (forward, acceptance walk, cache pruning); ``other_s``: the rest (stop checks, callbacks).
- ``stopped_by``: why generation stopped: ``eos``, ``max_new_tokens``, ``context`` (prompt and
  output reached the model's context length) or ``stop_string`` (see dresd.stopping).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    step_tokens: int = 0  # tokens emitted by verify steps
    accepted_tokens: int = 0
    proposed_tokens: int = 0
    tree_tokens: int = 0
    total_s: float = 0.0
    prefill_s: float = 0.0
    drafting_s: float = 0.0
    verify_s: float = 0.0
    stopped_by: str = ""  # eos, max_new_tokens, context or stop_string

    @property
    def accepted_length(self) -> float:
        return self.step_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    @property
    def retrieval_s(self) -> float:
        """``drafting_s`` under its former name, the key result files and ``to_dict`` keep."""
        return self.drafting_s

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.drafting_s - self.verify_s)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(AL=self.accepted_length, AR=self.acceptance_rate, TPS=self.tokens_per_second,
                 other_s=self.other_s, retrieval_s=self.retrieval_s)
        return d

    def summary(self) -> str:
        return (
            f"tokens {self.new_tokens} in {self.steps} steps | AL {self.accepted_length:.2f} | "
            f"AR {self.acceptance_rate:.2f} | TPS {self.tokens_per_second:.1f} | "
            f"time {self.total_s:.2f}s: prefill {self.prefill_s:.2f}s, drafting (retrieval + "
            f"planning) {self.drafting_s:.3f}s, verify {self.verify_s:.2f}s, other "
            f"{self.other_s:.2f}s | "
            f"stopped by {self.stopped_by}"
        )


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # new tokens, EOS included when generation stopped on it
    prompt_tokens: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)
