"""Fit the key transform (z-score, PCA to d, L2 norm) and train the IVF quantizer on a sample.

Both are written once into the store (content-addressed names, never overwritten) and flow on
as one ``FittedKeys`` singleton that the encode and index steps take as a side input.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np

from dresd.transform import KeyTransform, fit_transform
from pipelines.config import BuildConfig
from pipelines.faults import maybe_fail
from pipelines.index import auto_nlist, index_to_bytes, train_quantizer, write_index
from schemas import IndexSpec, Manifest, StoreFormatError, TransformSpec
from schemas.manifest import make_file_ref

log = logging.getLogger(__name__)

TRANSFORM_DIR = "transform"
INDEX_DIR = "index"


@dataclass(frozen=True)
class FittedKeys:
    transform: KeyTransform
    quantizer: bytes  # serialized trained, empty faiss index
    transform_spec: TransformSpec
    index_spec: IndexSpec


def _short_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fit_keys(states: np.ndarray, config: BuildConfig, num_keys: int, store: str) -> FittedKeys:
    """Fit on sampled hidden states [n, H], save both artifacts into the store."""
    if len(states) < 2:
        raise ValueError(f"only {len(states)} hidden state(s) sampled; the corpus is too small "
                         "to fit the transform")
    if config.dim > states.shape[1]:
        raise ValueError(f"dim={config.dim} exceeds the model's hidden size {states.shape[1]}")
    transform = fit_transform(states, config.dim)
    explained = float(transform.explained_variance.sum())
    keys = transform(states)
    nlist = config.nlist or auto_nlist(num_keys, len(keys))
    quantizer = train_quantizer(keys, config.index_kind, nlist, config.pq_m, config.pq_nbits,
                                config.nprobe, config.seed)
    quantizer_bytes = index_to_bytes(quantizer)

    root = Path(store)
    t_rel = f"{TRANSFORM_DIR}/pca-{config.dim}-{_short_digest(transform.to_bytes())}.npz"
    q_rel = f"{INDEX_DIR}/{config.index_kind}-{nlist}-{_short_digest(quantizer_bytes)}.faiss"
    transform.save(root / t_rel)
    (root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    write_index(quantizer, root / q_rel)
    maybe_fail("after_fit")
    log.info("transform: %d states, %d -> %d dims, explained variance %.3f; index %s nlist=%d",
             len(states), states.shape[1], config.dim, explained, config.index_kind, nlist)
    pq = config.index_kind == "ivf_pq"
    return FittedKeys(
        transform=transform,
        quantizer=quantizer_bytes,
        transform_spec=TransformSpec(
            file=make_file_ref(store, t_rel), input_dim=transform.input_dim, dim=transform.dim,
            sample_size=len(states), explained_variance=min(explained, 1.0),
        ),
        index_spec=IndexSpec(
            kind=config.index_kind, nlist=nlist, nprobe=config.nprobe,
            pq_m=config.pq_m if pq else 0, pq_nbits=config.pq_nbits if pq else 0,
            train_size=len(keys), quantizer=make_file_ref(store, q_rel),
        ),
    )


def load_fitted(store: str, manifest: Manifest) -> FittedKeys:
    """The transform and quantizer a store was built with, checked against their digests."""
    return fitted_from_specs(store, manifest.transform, manifest.index)


def fitted_from_specs(store: str, transform: TransformSpec, index: IndexSpec) -> FittedKeys:
    """FittedKeys from the files the specs name, checked against their digests."""
    for ref in (transform.file, index.quantizer):
        if make_file_ref(store, ref.path) != ref:
            raise StoreFormatError(f"{Path(store) / ref.path} does not match its manifest digest")
    quantizer = (Path(store) / index.quantizer.path).read_bytes()
    return FittedKeys(
        transform=KeyTransform.load(Path(store) / transform.file.path),
        quantizer=quantizer,
        transform_spec=transform,
        index_spec=index,
    )


def _fit_collected(states: list[np.ndarray], config: BuildConfig, num_keys: int, store: str,
                   ) -> FittedKeys | None:
    if not states and num_keys == 0:
        return None  # no usable document at all: nothing to fit, nothing will be published
    sample = np.concatenate(states) if states else np.zeros((0, 0), np.float32)
    return fit_keys(sample, config, num_keys, store)


class FitTransform(beam.PTransform):
    """Sampled hidden-state arrays -> one FittedKeys (use as a singleton side input)."""

    def __init__(self, config: BuildConfig, store: str, num_keys):
        super().__init__()
        self.config = config
        self.store = str(store)
        self.num_keys = num_keys  # singleton PCollection: total keys of the corpus

    def expand(self, states):
        return (
            states
            | "Collect" >> beam.combiners.ToList()
            | "Fit" >> beam.Map(_fit_collected, self.config, beam.pvalue.AsSingleton(self.num_keys),
                                self.store)
        )
