"""Verify cost per tree size, measured on the device the model runs on.

Speculative decoding pays only when the tokens a verify pass accepts outweigh how much more that
pass costs than a one-token step, and that ratio differs by orders of magnitude between a CPU and
a GPU. ``calibrate`` measures the cost of one forward of n new tokens over a KV cache, relative to
n = 1, and saves it per model and device so later runs reuse it.

The curve is kept as measured, not forced to grow with n: on a CPU the matrix-multiply kernel
changes with the number of rows, and on the AMD EPYC this was developed on MKL takes 1.7 and 2.0
one-token passes for 2 and 3 rows but 1.4-1.8 for 4-16, with 7, 11 and 15 among the slow ones
(SmolLM2-135M, float32). A budget that saw a monotone curve would pay for the slow small trees
and never learn that four tokens cost less than two. Sizes are measured round-robin, so a drift
in the machine's speed hits all alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from dresd.models import cache_dir

DEFAULT_SIZES = tuple(range(1, 17)) + (20, 24, 28, 32, 40, 48, 64)
# Calibrations saved before version 2 were forced monotone (see above) and are measured again.
VERSION = 2


@dataclass(frozen=True)
class Calibration:
    model_fingerprint: str
    device: str
    past_len: int
    sizes: tuple[int, ...]
    seconds: tuple[float, ...]  # median wall time of one verify forward of n tokens
    version: int = VERSION

    def cost(self, n: int | np.ndarray) -> float | np.ndarray:
        """Seconds for a forward of n new tokens (elementwise for an array of sizes),
        interpolated between measured sizes."""
        c = np.interp(n, self.sizes, self.seconds)
        return float(c) if np.ndim(c) == 0 else c

    def relative_cost(self, n: int) -> float:
        return self.cost(n) / self.seconds[0]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        d = json.loads(Path(path).read_text())
        d.setdefault("version", 1)
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}  # fields of a later version
        return cls(**{**d, "sizes": tuple(d["sizes"]), "seconds": tuple(d["seconds"])})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores-{torch.get_num_threads()}threads"


def calibration_path(model_fingerprint: str, device: torch.device) -> Path:
    return cache_dir() / "calibration" / f"{model_fingerprint[:16]}-{device_name(device)}.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_verify_cost(
    model, sizes=DEFAULT_SIZES, past_len: int = 256, repeats: int = 10, fingerprint: str = "",
    progress: bool = True,
) -> Calibration:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    past = torch.randint(0, vocab, (1, past_len), generator=gen).to(device)
    cache = DynamicCache()
    model(past, cache=cache, use_cache=True)
    inputs = []
    for n in sizes:
        x = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        inputs.append((x, torch.arange(past_len, past_len + n, device=device)[None]))
    times: list[list[float]] = [[] for _ in sizes]
    from tqdm import tqdm

    for r in tqdm(range(repeats + 1), desc="calibrating verify cost", unit="round",
                  disable=not progress, leave=False):
        for i, (x, pos) in enumerate(inputs):
            _sync(device)
            t0 = time.perf_counter()
            model(x, cache=cache, position_ids=pos, use_cache=True)
            _sync(device)
            if r:  # the first round warms up kernels and the allocator
                times[i].append(time.perf_counter() - t0)
            cache.crop(-x.shape[1])
    seconds = [statistics.median(t) for t in times]
    return Calibration(fingerprint, device_name(device), past_len, tuple(sizes), tuple(seconds))


def saved_calibration(path: Path) -> Calibration | None:
    """The calibration saved at ``path``, or None when there is none or it is of an older
    version (to be measured again)."""
    if not path.is_file():
        return None
    cal = Calibration.load(path)
    return cal if cal.version >= VERSION else None


def load_or_measure(model, fingerprint: str, refresh: bool = False, **kw) -> Calibration:
    device = next(model.parameters()).device
    path = calibration_path(fingerprint, device)
    cal = None if refresh else saved_calibration(path)
    if cal is not None:
        return cal
    print(f"measuring {device_name(device)}'s verify cost per tree size once (saved to {path}; "
          "`dresd calibrate` shows it)", file=sys.stderr, flush=True)
    cal = measure_verify_cost(model, fingerprint=fingerprint, **kw)
    cal.save(path)
    return cal
