"""Verify cost per tree size, measured on the device the model runs on.

Speculative decoding pays only when the tokens a verify pass accepts outweigh how much more that
pass costs than a one-token step, and that ratio differs by orders of magnitude between a CPU and
a GPU. ``calibrate`` measures the cost of one verify pass of an n-token draft tree over a KV
cache (the decoder's own ``verify_tree``: tree attention mask, position ids, final hidden states,
logits for every node) and saves it per model, device and weights dtype so later runs reuse it.

The budget reads a non-decreasing fit of the measured curve (isotonic regression), not the
points themselves. The budget picks the tree size with the best expected tokens per second, so
with the raw points it would seek out any size whose cost was measured low by chance and verify
most steps at that size, paying its real cost. A real non-monotone step (a matmul kernel that
takes longer for 2-3 rows than for 4-16) is averaged out by the fit, which costs little: a tree
a node larger than needed. Every size up to 32 is measured, then sparser up to 64, round-robin,
so a drift in the machine's speed hits all alike. The saved file keeps the raw medians.

A curve measured while another process competes for the cores is wrong (two torch processes on
the same cores slow each other by far more than 2x, since OpenMP threads wait for descheduled
siblings), so every round's total time is kept and compared: when the rounds' spread,
(slowest - fastest) / median, exceeds ``TOLERANCE`` the curve is marked provisional.
``dresd calibrate`` then measures again and refuses to save one that stays provisional; a
provisional curve measured on first use is saved as such, used (the budget corrects it with the
passes it measures while decoding, see dresd.budget) and measured again by the next process.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from dresd.models import cache_dir, dtype_name, synchronize
from schemas.atomic import write_text_atomic

DEFAULT_SIZES = tuple(range(1, 33)) + (36, 40, 48, 56, 64)
# Calibrations saved before version 2 were forced monotone (see above); before version 3 they
# timed a plain causal forward at sparse sizes. Older ones are measured again.
VERSION = 3
# The rounds of a reliable calibration agree within this spread: (slowest - fastest) / median
# of the round totals. Quiet 2-core machines give 2-10%; a competing process gives 100% and up.
TOLERANCE = 0.3
# ... unless the slowest and fastest rounds differ by less than this (a tiny model's rounds
# take milliseconds, where scheduling jitter alone is tens of percent and costs nothing).
MIN_SPREAD_S = 0.1


@dataclass(frozen=True)
class Calibration:
    model_fingerprint: str
    device: str
    past_len: int
    sizes: tuple[int, ...]
    seconds: tuple[float, ...]  # median wall time of one verify pass of an n-token tree
    version: int = VERSION
    round_seconds: tuple[float, ...] = ()  # each measured round's total, in order
    provisional: bool = False  # the rounds disagreed beyond TOLERANCE

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median of the round totals (0 when not recorded)."""
        if len(self.round_seconds) < 2:
            return 0.0
        r = self.round_seconds
        return (max(r) - min(r)) / statistics.median(r)

    def describe_rounds(self) -> str:
        if not self.round_seconds:
            return "rounds not recorded"
        r = self.round_seconds
        return (f"{len(r)} rounds of {min(r):.2f}-{max(r):.2f} s, spread {100 * self.spread:.0f}% "
                f"(tolerance {100 * TOLERANCE:.0f}%)")

    def cost(self, n: int | np.ndarray) -> float | np.ndarray:
        """Seconds for a verify pass of n tree tokens (elementwise for an array of sizes): the
        non-decreasing fit of the measured medians, interpolated between measured sizes."""
        c = np.interp(n, self.sizes, self._fit)
        return float(c) if np.ndim(c) == 0 else c

    @functools.cached_property
    def _fit(self) -> np.ndarray:  # the budget reads the cost every step: fit once
        return self.fitted()

    def fitted(self) -> np.ndarray:
        """The measured medians made non-decreasing in size: isotonic regression, each pooled
        block's mean placed at the block's central size and linearly interpolated between
        blocks, so the curve also rises within a block (a flat block would send every tree to
        its largest size, where the cost is above the block's mean)."""
        sizes = np.asarray(self.sizes, np.float64)
        centres, means, start = [], [], 0
        for mean, count in _pooled_blocks(self.seconds):
            centres.append(sizes[start:start + count].mean())
            means.append(mean)
            start += count
        return np.interp(sizes, centres, means)

    def relative_cost(self, n: int) -> float:
        return self.cost(n) / self.cost(1)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        d = json.loads(Path(path).read_text())
        d.setdefault("version", 1)
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}  # fields of a later version
        return cls(**{**d, "sizes": tuple(d["sizes"]), "seconds": tuple(d["seconds"]),
                      "round_seconds": tuple(d.get("round_seconds", ()))})


def _pooled_blocks(values) -> list[tuple[float, int]]:
    """Pool adjacent violators: (mean, length) of the runs of ``values`` the non-decreasing
    least-squares fit pools together."""
    blocks: list[tuple[float, int]] = []
    for v in values:
        blocks.append((float(v), 1))
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append(((m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2))
    return blocks


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores-{torch.get_num_threads()}threads"


def calibration_path(model_fingerprint: str, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Per model, device and (when not float32) weights dtype: each has its own costs."""
    suffix = "" if dtype == torch.float32 else f"-{dtype_name(dtype)}"
    name = f"{model_fingerprint[:16]}-{device_name(device)}{suffix}.json"
    return cache_dir() / "calibration" / name


@torch.inference_mode()
def measure_verify_cost(
    model, sizes=DEFAULT_SIZES, past_len: int = 256, repeats: int = 10, fingerprint: str = "",
    progress: bool = True,
) -> Calibration:
    from tqdm import tqdm
    from transformers import DynamicCache

    from dresd.tree import verify_tree

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    past = torch.randint(0, vocab, (1, past_len), generator=gen).to(device)
    cache = DynamicCache()
    model(past, cache=cache, use_cache=True)
    trees = [_synthetic_tree(n, vocab, gen) for n in sizes]
    times: list[list[float]] = [[] for _ in sizes]
    for r in tqdm(range(repeats + 1), desc="calibrating verify cost", unit="round",
                  disable=not progress, leave=False):
        for i, tree in enumerate(trees):
            synchronize(device)
            t0 = time.perf_counter()
            verify_tree(model, tree, cache)
            synchronize(device)
            if r:  # the first round warms up kernels and the allocator
                times[i].append(time.perf_counter() - t0)
            cache.crop(-len(tree))
    seconds = [statistics.median(t) for t in times]
    rounds = tuple(float(sum(t[r] for t in times)) for r in range(repeats))
    cal = Calibration(fingerprint, device_name(device), past_len, tuple(sizes), tuple(seconds),
                      round_seconds=rounds)
    unreliable = cal.spread > TOLERANCE and max(rounds) - min(rounds) > MIN_SPREAD_S
    return replace(cal, provisional=unreliable)


def _synthetic_tree(n: int, vocab: int, gen: torch.Generator, draft_len: int = 8):
    """An n-node tree of random tokens shaped like a composite's: branches of ``draft_len``
    under the root."""
    from dresd.drafters.base import Draft
    from dresd.tree import DraftTree, TreeBudget

    if vocab < n:
        raise ValueError(f"cannot calibrate a {n}-token tree over a vocabulary of {vocab}")
    toks = torch.randperm(vocab, generator=gen)[:n].tolist()  # distinct: no branches merge
    rest = toks[1:]
    drafts = [Draft(tuple(rest[i:i + draft_len]), 1.0) for i in range(0, len(rest), draft_len)]
    return DraftTree.build(toks[0], drafts, TreeBudget(len(drafts), draft_len, n))


def saved_calibration(path: Path) -> Calibration | None:
    """The calibration saved at ``path``, or None when there is none or it is of an older
    version (to be measured again)."""
    if not path.is_file():
        return None
    cal = Calibration.load(path)
    return cal if cal.version >= VERSION else None


def load_or_measure(model, fingerprint: str, refresh: bool = False, **kw) -> Calibration:
    """The saved calibration, or one measured now and saved. A saved provisional one (its
    rounds disagreed) is measured again; the new one is saved either way, provisional if its
    rounds disagree too."""
    param = next(model.parameters())
    device = param.device
    path = calibration_path(fingerprint, device, param.dtype)
    old = None if refresh else saved_calibration(path)
    if old is not None and not old.provisional:
        return old
    again = "again (the saved one is provisional) " if old is not None else ""
    print(f"measuring {device_name(device)}'s verify cost per tree size {again}(saved to {path}; "
          "`dresd calibrate` shows it)", file=sys.stderr, flush=True)
    cal = measure_verify_cost(model, fingerprint=fingerprint, **kw)
    if cal.provisional:
        print(f"warning: the calibration is unreliable ({cal.describe_rounds()}): another process "
              "is probably using the cores. It is saved as provisional, corrected by the verify "
              "passes measured while decoding, and measured again next time.",
              file=sys.stderr, flush=True)
    cal.save(path)
    return cal
