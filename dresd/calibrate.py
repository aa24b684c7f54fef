"""Verify cost per tree size, measured on the device the model runs on.

Speculative decoding pays only when the tokens a verify pass accepts outweigh how much more that
pass costs than a one-token step, and that ratio differs by orders of magnitude between a CPU and
a GPU. ``calibrate`` measures the cost of one forward of n new tokens over a KV cache, relative to
n = 1, and saves it per model and device so later runs reuse it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dresd.models import cache_dir

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Calibration:
    model_fingerprint: str
    device: str
    past_len: int
    sizes: tuple[int, ...]
    seconds: tuple[float, ...]  # median wall time of one verify forward of n tokens

    def cost(self, n: int) -> float:
        """Seconds for a forward of n new tokens, interpolated between measured sizes."""
        return float(np.interp(n, self.sizes, self.seconds))

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
    model, sizes=DEFAULT_SIZES, past_len: int = 256, repeats: int = 5, fingerprint: str = ""
) -> Calibration:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    past = torch.randint(0, vocab, (1, past_len), generator=gen).to(device)
    cache = DynamicCache()
    model(past, cache=cache, use_cache=True)
    seconds = []
    for n in sizes:
        x = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        pos = torch.arange(past_len, past_len + n, device=device)[None]
        times = []
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(x, cache=cache, position_ids=pos, use_cache=True)
            _sync(device)
            if i:  # the first run warms up kernels and allocator
                times.append(time.perf_counter() - t0)
            cache.crop(-n)
        seconds.append(statistics.median(times))
    # Costs must not decrease with n; timing noise sometimes says otherwise.
    seconds = np.maximum.accumulate(np.array(seconds)).tolist()
    return Calibration(fingerprint, device_name(device), past_len, tuple(sizes), tuple(seconds))


def load_or_measure(model, fingerprint: str, refresh: bool = False, **kw) -> Calibration:
    device = next(model.parameters()).device
    path = calibration_path(fingerprint, device)
    if path.is_file() and not refresh:
        return Calibration.load(path)
    cal = measure_verify_cost(model, fingerprint=fingerprint, **kw)
    cal.save(path)
    return cal
