"""The model forward of the builder: token windows in, final hidden states out.

Documents longer than ``max_len`` are cut into consecutive windows, each encoded on its own (a
window's first positions see less context than they would in one long pass; the cost of a pass
grows with the square of its length, and the model's position range is finite). Windows are
sorted by length and packed under a token budget that counts padding, so a batch wastes little.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Window:
    offset: int  # where the window starts in the concatenated token stream
    tokens: np.ndarray  # int32


def split_windows(streams: Sequence[np.ndarray], max_len: int) -> list[Window]:
    """Windows of at most ``max_len`` tokens over documents laid out back to back."""
    windows, offset = [], 0
    for tokens in streams:
        for s in range(0, len(tokens), max_len):
            windows.append(Window(offset + s, tokens[s:s + max_len]))
        offset += len(tokens)
    return windows


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest row <= budget in every batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, the first row of a batch is its longest.
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class HiddenStateModel:
    """A causal LM without its head, on the best device, run in inference mode."""

    def __init__(self, model: str, device: str = "", dtype: str = ""):
        from dresd.models import load_model, pick_device

        # Keys need no bit-exactness, so on a GPU the encoder defaults to bfloat16 weights
        # (half the memory; the forward runs under bfloat16 autocast anyway).
        if not dtype and pick_device(device or None).type == "cuda":
            dtype = "bfloat16"
        self.model, self.tokenizer = load_model(model, device or None, dtype or None)
        self.base = self.model.base_model
        self.device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """Final hidden states [B, L, H] (after the final norm) of right-padded rows."""
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        input_ids = torch.from_numpy(ids).to(self.device)
        # An all-ones mask changes nothing but can cost a slower attention path.
        attention = None if mask.all() else torch.from_numpy(mask).to(self.device)
        with torch.inference_mode(), self._autocast():
            out = self.base(input_ids=input_ids, attention_mask=attention).last_hidden_state
        return out, lengths


def encode_stream(
    model: HiddenStateModel,
    streams: Sequence[np.ndarray],
    out_dim: int,
    project: Callable[[torch.Tensor], torch.Tensor],
    out_dtype,
    batch_tokens: int,
    max_len: int,
    progress: bool = False,
    desc: str = "encode",
) -> np.ndarray:
    """``project(h_t)`` for every token of the documents laid back to back: [T, out_dim]."""
    windows = split_windows(streams, max_len)
    total = sum(len(s) for s in streams)
    result = np.empty((total, out_dim), out_dtype)
    batches = token_budget_batches([len(w.tokens) for w in windows], batch_tokens)
    bar = _progress(total, desc, progress)
    for batch in batches:
        rows = [windows[i] for i in batch]
        hidden, lengths = model.forward([w.tokens for w in rows])
        projected = project(hidden).to("cpu", torch.float32).numpy()
        for w, row, n in zip(rows, projected, lengths):
            result[w.offset:w.offset + n] = row[:n]
        bar.update(sum(lengths))
    bar.close()
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled,
                leave=False)
