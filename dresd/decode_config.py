"""What one ``generate`` call decodes with: ``DecodeConfig``, every field a keyword of
``dresd.generate`` and a flag of ``dresd generate``.

Apart from the decode loop (dresd.decode) so that what reads a config, such as the drafter
assembly (dresd.drafters.assemble), does not import the loop that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dresd.config import option
from dresd.drafters import registry
from dresd.sampling import SamplingParams
from dresd.tree import TreeBudget

BUDGET_POLICIES = ("calibrated", "fixed")


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
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.nprobe < 0:
            raise ValueError(f"nprobe must be >= 0 (0: the store's default), got {self.nprobe}")
        if self.budget not in BUDGET_POLICIES:
            raise ValueError(f"budget must be one of {BUDGET_POLICIES}, not {self.budget!r}")
        registry.drafter_names(self.drafter, has_store=True)  # validates the names
        # Building them validates temperature, top-k, top-p and the tree budget.
        _ = (self.sampling, self.tree_budget)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def tree_budget(self) -> TreeBudget:
        return TreeBudget(self.num_drafts, self.draft_len, self.max_tree_tokens)
