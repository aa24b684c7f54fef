"""Fit the key transform (z-score, PCA to d, L2 norm) on sampled states; train the index
quantizer on keys sampled from the encoded shards.

Both are written once into the store (content-addressed names, never overwritten) and flow on
as one ``FittedKeys`` singleton that the encode and index steps take as a side input: the
transform before encoding, the trained quantizer (``TrainIndex``) before filling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from dresd.transform import KeyTransform, fit_transform
from pipelines.config import BuildConfig
from pipelines.documents import WrittenShard
from pipelines.faults import maybe_fail
from pipelines.index import (
    POINTS_PER_LIST,
    auto_nlist,
    auto_pq_m,
    auto_train_size,
    code_size,
    factory_string,
    index_to_bytes,
    sample_keys,
    train_quantizer,
    write_index,
)
from pipelines.stage_clock import stage_clock
from schemas import IndexSpec, Manifest, StoreFormatError, TransformSpec
from schemas.manifest import make_file_ref
from schemas.storage import staged, store_io

log = logging.getLogger(__name__)

TRANSFORM_DIR = "transform"
INDEX_DIR = "index"


@dataclass(frozen=True)
class FittedKeys:
    transform: KeyTransform
    quantizer: bytes | None  # serialized trained, empty faiss index (None until trained)
    transform_spec: TransformSpec
    index_spec: IndexSpec | None


def _short_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fit_keys(states: np.ndarray, config: BuildConfig, store: str) -> FittedKeys:
    """Fit the transform on sampled hidden states [n, H] and save it into the store."""
    if len(states) < 2:
        raise ValueError(f"only {len(states)} hidden state(s) sampled; the corpus is too small "
                         "to fit the transform")
    if config.dim > states.shape[1]:
        raise ValueError(f"dim={config.dim} exceeds the model's hidden size {states.shape[1]}")
    transform = fit_transform(states, config.dim)
    explained = float(transform.explained_variance.sum())
    t_rel = f"{TRANSFORM_DIR}/pca-{config.dim}-{_short_digest(transform.to_bytes())}.npz"
    with staged(store) as root:  # a remote store: saved here, then uploaded
        transform.save(root / t_rel)
        ref = make_file_ref(root, t_rel)
    log.info("transform: %d states, %d -> %d dims, explained variance %.3f",
             len(states), states.shape[1], config.dim, explained)
    maybe_fail("after_fit")
    return FittedKeys(
        transform=transform, quantizer=None,
        transform_spec=TransformSpec(
            file=ref, input_dim=transform.input_dim, dim=transform.dim,
            sample_size=len(states), explained_variance=min(explained, 1.0),
        ),
        index_spec=None,
    )


def train_index(keys: np.ndarray, config: BuildConfig, num_keys: int, store: str,
                fitted: FittedKeys) -> FittedKeys:
    """Train the quantizer on sampled keys [n, d] of a store of ``num_keys`` keys, save it,
    and return ``fitted`` with it."""
    kind = config.index_kind
    if kind == "ivf_pq" and len(keys) < POINTS_PER_LIST * 2 ** config.pq_nbits:
        # PQ codebooks trained on fewer keys than faiss asks for (39 per centroid) score
        # neighbours badly; a store this small costs little uncompressed.
        log.warning("only %d keys: too few to train %d PQ centroids well (%d wanted), the index "
                    "stores them uncompressed (ivf_flat)", len(keys), 2 ** config.pq_nbits,
                    POINTS_PER_LIST * 2 ** config.pq_nbits)
        kind = "ivf_flat"
    nlist = min(config.nlist, len(keys)) if config.nlist else auto_nlist(num_keys, len(keys))
    pq_m = config.pq_m or auto_pq_m(keys.shape[1])
    start = time.perf_counter()
    quantizer = train_quantizer(keys, kind, nlist, pq_m, config.pq_nbits, config.nprobe,
                                config.seed)
    quantizer_bytes = index_to_bytes(quantizer)
    q_rel = f"{INDEX_DIR}/{kind}-{nlist}-{_short_digest(quantizer_bytes)}.faiss"
    with staged(store) as root:  # a remote store: written here, then uploaded
        (root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
        write_index(quantizer, root / q_rel)
        q_ref = make_file_ref(root, q_rel)
    pq = kind == "ivf_pq"
    log.info("index %s nlist=%d trained on %d keys in %.1f s", kind, nlist, len(keys),
             time.perf_counter() - start)
    return dataclasses.replace(fitted, quantizer=quantizer_bytes, index_spec=IndexSpec(
        kind=kind, nlist=nlist, nprobe=config.nprobe, pq_m=pq_m if pq else 0,
        pq_nbits=config.pq_nbits if pq else 0, train_size=len(keys),
        quantizer=q_ref,
        factory=factory_string(kind, nlist, pq_m, config.pq_nbits),
        code_size=code_size(quantizer),
    ))


def load_fitted(store: str, manifest: Manifest) -> FittedKeys:
    """The transform and quantizer a store was built with, checked against their digests."""
    return fitted_from_specs(store, manifest.transform, manifest.index)


def fitted_from_specs(store: str, transform: TransformSpec, index: IndexSpec) -> FittedKeys:
    """FittedKeys from the files the specs name, checked against their digests."""
    with staged(store, [transform.file.path, index.quantizer.path]) as root:
        for ref in (transform.file, index.quantizer):
            if make_file_ref(root, ref.path) != ref:
                raise StoreFormatError(f"{store_io(store).where(ref.path)} does not match its "
                                       "manifest digest")
        quantizer = (root / index.quantizer.path).read_bytes()
        key_transform = KeyTransform.load(root / transform.file.path)
    return FittedKeys(
        transform=key_transform,
        quantizer=quantizer,
        transform_spec=transform,
        index_spec=index,
    )


def _fit_collected(states: list[np.ndarray], config: BuildConfig, store: str,
                   ) -> FittedKeys | None:
    if not states:
        return None  # no usable document at all: nothing to fit, nothing will be published
    with stage_clock("fit"):
        return fit_keys(np.concatenate(states), config, store)


class FitTransform(beam.PTransform):
    """Sampled hidden-state arrays -> one FittedKeys without a quantizer (a singleton side
    input of the encoder)."""

    def __init__(self, config: BuildConfig, store: str):
        super().__init__()
        self.config = config
        self.store = store_io(store)

    def expand(self, states):
        return (
            states
            | "Collect" >> beam.combiners.ToList()
            | "Fit" >> beam.Map(_fit_collected, self.config, self.store)
        )


def _train_collected(shards: list[WrittenShard], fitted: FittedKeys | None, config: BuildConfig,
                     store: str) -> FittedKeys | None:
    if fitted is None or not shards:
        return fitted
    num_keys = sum(s.num_keys for s in shards)
    if num_keys == 0:
        raise ValueError("the encoded shards hold no keys: nothing to train the index on")
    size = min(config.train_size, num_keys) if config.train_size else auto_train_size(num_keys)
    with stage_clock("train"):
        keys = sample_keys(store, shards, size, config.seed)
        return train_index(keys, config, num_keys, store, fitted)


class TrainIndex(beam.PTransform):
    """WrittenShards (keys staged) -> the FittedKeys with its quantizer trained on a sample of
    their keys (a singleton side input of the fill step)."""

    def __init__(self, config: BuildConfig, store: str, fitted):
        super().__init__()
        self.config = config
        self.store = store_io(store)
        self.fitted = fitted  # singleton PCollection of FittedKeys (transform only)

    def expand(self, shards):
        return (
            shards
            | "Collect" >> beam.combiners.ToList()
            | "Train" >> beam.Map(_train_collected, beam.pvalue.AsSingleton(self.fitted),
                                  self.config, self.store)
        )
