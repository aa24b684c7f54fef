"""The key transform: z-score each dimension, project with PCA to d, L2-normalise.

Fitted once by the builder on a sample of hidden states; applied to keys at build time and to
queries at decode time, so dot products between them are cosine similarities.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from schemas.atomic import write_bytes_atomic


@dataclass(frozen=True)
class KeyTransform:
    mean: np.ndarray  # float32 [H]
    std: np.ndarray  # float32 [H], floored so constant dimensions do not divide by zero
    components: np.ndarray  # float32 [H, d], columns are principal axes
    explained_variance: np.ndarray  # float32 [d], fraction of z-scored variance per axis

    @property
    def input_dim(self) -> int:
        return self.components.shape[0]

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """float32 [n, H] -> float32 [n, d], unit norm."""
        z = (np.asarray(hidden, np.float32) - self.mean) / self.std
        r = z @ self.components
        r /= np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12)
        return r

    def torch_apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """The same transform on a tensor, on its device (float32 math); returns float32."""
        dev = hidden.device
        mean, std, comp = self._tensors(dev)
        r = ((hidden.float() - mean) / std) @ comp
        return torch.nn.functional.normalize(r, dim=-1)

    def _tensors(self, device: torch.device):
        cache = self.__dict__.setdefault("_torch_cache", {})
        if device not in cache:
            cache[device] = tuple(
                torch.from_numpy(a).to(device) for a in (self.mean, self.std, self.components)
            )
        return cache[device]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            mean=self.mean,
            std=self.std,
            components=self.components,
            explained_variance=self.explained_variance,
        )
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> None:
        write_bytes_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyTransform:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                mean=z["mean"].astype(np.float32),
                std=z["std"].astype(np.float32),
                components=z["components"].astype(np.float32),
                explained_variance=z["explained_variance"].astype(np.float32),
            )


def fit_transform(sample: np.ndarray, dim: int) -> KeyTransform:
    """Fit z-score + PCA on a sample of hidden states [n, H] (float32 or float64)."""
    x = np.asarray(sample, np.float64)
    n, h = x.shape
    if dim > h:
        raise ValueError(f"cannot reduce {h}-dimensional states to d={dim}")
    if n < 2:
        raise ValueError("need at least two hidden states to fit the transform")
    mean = x.mean(0)
    std = np.maximum(x.std(0), 1e-6)
    z = (x - mean) / std
    cov = (z.T @ z) / max(n - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    total = evals.sum() or 1.0
    return KeyTransform(
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        components=np.ascontiguousarray(evecs[:, :dim], dtype=np.float32),
        explained_variance=(evals[:dim] / total).astype(np.float32),
    )
