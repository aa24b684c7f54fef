"""What one ``generate`` call decodes with: ``DecodeConfig``, every field a keyword of
``dresd.generate`` and a flag of ``dresd generate``.

Apart from the decode loop (dresd.decode) so that what reads a config, such as the drafter
assembly (dresd.drafters.assemble), does not import the loop that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

from dresd.config import option
from dresd.drafters import registry
from dresd.sampling import SamplingParams
from dresd.tree import TreeBudget, check_int

BUDGET_POLICIES = ("calibrated", "fixed")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, not {value!r:.60}")


def _stop_strings(value) -> tuple[str, ...]:
    """``stop_strings`` as a tuple (a list is taken too), each a non-empty str."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise TypeError(f"stop_strings must be a tuple of strings, not {value!r:.60}"
                        + (f" (write ({value!r},) for one)" if isinstance(value, str) else ""))
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise TypeError(f"stop_strings[{i}] must be a str, not {s!r:.60}")
        if not s:
            raise ValueError(f"stop_strings[{i}] is empty: a stop string needs a character")
    return tuple(value)


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = option(128, "tokens to generate at most")
    num_drafts: int = option(10, "drafts merged into the tree per step")
    draft_len: int = option(10, "tokens kept of each draft")
    max_tree_tokens: int = option(64, "tree nodes verified per forward, root included")
    k: int = option(10, "nearest keys the dense and context sources retrieve per step (each "
                    "is one draft)")
    nprobe: int = option(0, "IVF lists probed per search (0: the store's default)")
    temperature: float = option(0.0, "0 decodes greedily; > 0 samples")
    top_k: int = option(0, "sample among the k likeliest tokens (0: off)")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    seed: int = option(0, "random seed for sampling")
    stop_strings: tuple[str, ...] = option((), "stop when the text contains one of these")
    drafter: str = option(
        "hybrid", "draft sources when decoding from a store (or from none): 'hybrid' ("
        + " + ".join(registry.hybrid_names(True)) + " in one tree; without a store, "
        + " + ".join(registry.hybrid_names(False)) + ") or a comma-separated list of: "
        + registry.drafter_help())
    budget: str = option(
        "calibrated", "tree size per step: 'calibrated' (maximise expected tokens per second "
        "under this device's measured verify cost, saved by `dresd calibrate`) or 'fixed' "
        "(fill max_tree_tokens)", choices=BUDGET_POLICIES)

    def __post_init__(self):
        # Each field by its own name: its type first (so a wrong type never reaches a check
        # that would fail on another field's behalf), then its range.
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("num_drafts", self.num_drafts, 0)
        check_int("draft_len", self.draft_len, 0)
        check_int("max_tree_tokens", self.max_tree_tokens, 1, " (the root)")
        check_int("k", self.k, 1)
        check_int("nprobe", self.nprobe, 0, " (0: the store's default)")
        _check_number("temperature", self.temperature)
        check_int("top_k", self.top_k, 0, " (0: off)")
        _check_number("top_p", self.top_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise TypeError(f"seed must be an int, not {self.seed!r:.60}")
        if not -2**63 <= self.seed < 2**64:
            raise ValueError(f"seed must be between -2**63 and 2**64 - 1, not {self.seed}")
        object.__setattr__(self, "stop_strings", _stop_strings(self.stop_strings))
        for name in ("drafter", "budget"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, not {getattr(self, name)!r:.60}")
        if self.budget not in BUDGET_POLICIES:
            raise ValueError(f"budget must be one of {BUDGET_POLICIES}, not {self.budget!r}")
        registry.drafter_names(self.drafter, has_store=True)  # validates the names
        # Building them checks the ranges of temperature and top-p.
        _ = (self.sampling, self.tree_budget)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def tree_budget(self) -> TreeBudget:
        return TreeBudget(self.num_drafts, self.draft_len, self.max_tree_tokens)
