"""Build, update and compact a store: the builder's Python API.

    from pipelines.build import build_store, update_store, compact_store
    from pipelines.config import BuildConfig
    manifest = build_store("corpus/", "store/", BuildConfig(glob="**/*.py"))

Each function composes the small PTransforms of this package into one Beam pipeline, runs it on
the runner the Beam options name (DirectRunner by default), and returns the live manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import apache_beam as beam

from pipelines.config import BuildConfig
from pipelines.dead_letter import (
    DEAD_LETTER_DIR,
    WriteDeadLetters,
    read_dead_letters,
    summarize,
)
from pipelines.dedupe import NAMESPACE, DropKnownDocuments
from pipelines.encode import ENCODED_TOKENS, EncodeShards, EncodeTiming
from pipelines.fit import INDEX_DIR, TRANSFORM_DIR, FitTransform, TrainIndex, load_fitted
from pipelines.index import FillShardIndex
from pipelines.options import pipeline_options
from pipelines.publish import Publish
from pipelines.readers import DEAD, ReadCorpus, list_corpus_files
from pipelines.sample import SampleStates
from pipelines.tokenize import Tokenize
from schemas import Manifest, ModelSpec, StoreFormatError, read_manifest
from schemas.integrity import VERIFIED_DIR
from schemas.manifest import CURRENT_FILE, MANIFEST_DIR
from schemas.shard_io import SHARDS_DIR

log = logging.getLogger(__name__)

Corpus = str | os.PathLike | Iterable[str | os.PathLike]


def describe_model(config: BuildConfig) -> ModelSpec:
    """Load the model once in the launcher to fingerprint it for the manifest."""
    from dresd.models import eos_token_id, load_model, model_fingerprint, tokenizer_fingerprint

    model, tokenizer = load_model(config.model, "cpu", "float32")
    cfg = model.config
    return ModelSpec(
        name=str(config.model),
        fingerprint=model_fingerprint(model, tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        eos_token_id=eos_token_id(model, tokenizer),
    )


# Everything a store directory holds at its top level (a failed build may leave some of it).
STORE_ENTRIES = {CURRENT_FILE, MANIFEST_DIR, SHARDS_DIR, TRANSFORM_DIR, INDEX_DIR, DEAD_LETTER_DIR,
                 VERIFIED_DIR}


def _check_new_store(store: str) -> None:
    """A new store goes into a new or empty directory, or one a failed build left behind."""
    root = Path(store)
    if (root / CURRENT_FILE).exists():
        raise ValueError(f"{store} is already a store; use update to add documents")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{store} is a file, not a store directory")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in STORE_ENTRIES
                     and not p.name.startswith(".")) if root.is_dir() else []
    if foreign:
        raise ValueError(f"{store} holds files that are not a store's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); build writes into a new or "
                         "empty directory, named first, before the corpus")


def _corpus_files(corpus: Corpus, glob: str, store: str) -> list[str]:
    """The corpus files, none of which may lie inside the store (swapped arguments)."""
    files = list_corpus_files(corpus, glob)
    root = Path(store).resolve()
    inside = [f for f in files if root in Path(f).resolve().parents]
    if inside:
        raise ValueError(f"{len(inside)} corpus file(s) lie inside the store directory {store} "
                         f"(e.g. {inside[0]}); the store is the first argument, the corpus follows")
    return files


def _read_documents(p, files, config: BuildConfig, store: str, known_shards: list[str],
                    generation: int):
    """ReadCorpus -> DropKnownDocuments -> Tokenize, dead letters written; tokenized docs."""
    read = p | "ReadCorpus" >> ReadCorpus(files, config.prompt_field, config.response_field,
                                          config.max_doc_bytes)
    new = read.docs | "DropKnown" >> DropKnownDocuments(store, known_shards)
    tokenized = new | "Tokenize" >> Tokenize(config.model)
    _ = (
        (read[DEAD], tokenized[DEAD])
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> WriteDeadLetters(store, generation)
    )
    return tokenized.tokenized


@dataclasses.dataclass
class RunMetrics:
    """The builder's Beam metrics of one run, summed (counters) and merged (distributions)
    over steps and workers."""

    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    distributions: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def encode(self) -> EncodeTiming | None:
        return EncodeTiming.from_metrics(self.counters, self.distributions)


def _run(p: beam.Pipeline) -> RunMetrics:
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    metrics = RunMetrics()
    for c in found["counters"]:
        name = c.key.metric.name
        metrics.counters[name] = metrics.counters.get(name, 0) + (c.committed or c.attempted or 0)
    for d in found["distributions"]:
        r = d.committed or d.attempted
        if r is None or not r.count:
            continue
        old = metrics.distributions.get(d.key.metric.name)
        metrics.distributions[d.key.metric.name] = {
            "count": r.count + (old["count"] if old else 0),
            "sum": r.sum + (old["sum"] if old else 0),
            "min": min(r.min, old["min"]) if old else r.min,
            "max": max(r.max, old["max"]) if old else r.max,
        }
    return metrics


def _report(store: str, generation: int, metrics: RunMetrics,
            out: dict | None = None) -> None:
    letters = read_dead_letters(store, generation)
    if letters:
        log.warning("%d input(s) skipped (%s); details in %s/dead_letter/gen-%06d.parquet",
                    len(letters), summarize(letters), store, generation)
    for name, n in sorted(metrics.counters.items()):
        if n and name != ENCODED_TOKENS:
            log.info("%s: %d", name.replace("_", " "), n)
    if metrics.encode:
        log.info("%s", metrics.encode.describe())
    if out is not None:
        out["metrics"] = metrics


def build_store(corpus: Corpus, store: str | os.PathLike, config: BuildConfig | None = None,
                beam_args: Sequence[str] | None = None, stats: dict | None = None) -> Manifest:
    """Build a new store from a corpus: sample states and fit the transform, encode shards,
    train the index quantizer on their keys, fill each shard's lists, publish generation 1.

    ``stats``, when given, receives the run's ``RunMetrics`` under ``"metrics"`` (its
    ``encode`` timing included).
    """
    config = config or BuildConfig()
    store = str(store)
    _check_new_store(store)
    files = _corpus_files(corpus, config.glob, store)
    model = describe_model(config)
    Path(store).mkdir(parents=True, exist_ok=True)
    generation = 1

    p = beam.Pipeline(options=pipeline_options(beam_args))
    docs = _read_documents(p, files, config, store, [], generation)
    transform = (
        docs
        | "SampleStates" >> SampleStates(config)
        | "FitTransform" >> FitTransform(config, store)
    )
    shards = docs | "EncodeShards" >> EncodeShards(config, store, transform)
    fitted = shards | "TrainIndex" >> TrainIndex(config, store, transform)
    _ = (
        shards
        | "FillShardIndex" >> FillShardIndex(store, generation, fitted, model.vocab_size,
                                             config.keep_keys)
        | "Publish" >> Publish(store, generation, model, config.value_len, fitted,
                               note=config.note)
    )
    _report(store, generation, _run(p), stats)
    if not (Path(store) / CURRENT_FILE).exists():
        letters = read_dead_letters(store, generation)
        raise ValueError(f"no usable documents in the corpus ({len(files)} file(s)); "
                         f"{len(letters)} input(s) skipped: {summarize(letters) or 'none'}")
    return read_manifest(store)


def update_store(corpus: Corpus, store: str | os.PathLike, config: BuildConfig | None = None,
                 beam_args: Sequence[str] | None = None, stats: dict | None = None) -> Manifest:
    """Encode only documents new to the store into new shards and publish the next generation.

    The store's transform, quantizer, d and N are reused (``config``'s are ignored); the model
    must be the one the store was built with. ``stats`` as for ``build_store``.
    """
    store = str(store)
    current = read_manifest(store)
    config = dataclasses.replace(
        config or BuildConfig(model=current.model.name),
        dim=current.dim, value_len=current.value_len, index_kind=current.index.kind,
        nlist=current.index.nlist, nprobe=current.index.nprobe, pq_m=current.index.pq_m,
        **({"pq_nbits": current.index.pq_nbits} if current.index.kind == "ivf_pq" else {}),
    )
    model = describe_model(config)
    if model.fingerprint != current.model.fingerprint:
        raise StoreFormatError(
            f"model {config.model!r} (fingerprint {model.fingerprint[:12]}) is not the model "
            f"this store was built with ({current.model.name!r}, "
            f"{current.model.fingerprint[:12]})")
    files = _corpus_files(corpus, config.glob, store)
    fitted_value = load_fitted(store, current)
    generation = current.generation + 1

    p = beam.Pipeline(options=pipeline_options(beam_args))
    fitted = p | "FittedKeys" >> beam.Create([fitted_value])
    docs = _read_documents(p, files, config, store, [s.shard_id for s in current.shards],
                           generation)
    _ = (
        docs
        | "EncodeShards" >> EncodeShards(config, store, fitted)
        | "FillShardIndex" >> FillShardIndex(store, generation, fitted, model.vocab_size,
                                             config.keep_keys)
        | "Publish" >> Publish(store, generation, model, current.value_len, fitted,
                               base_shards=current.shards, parent=current.generation,
                               note=config.note or "update")
    )
    _report(store, generation, _run(p), stats)
    return read_manifest(store)


def compact_store(store: str | os.PathLike, shard_tokens: int | None = None,
                  beam_args: Sequence[str] | None = None) -> Manifest:
    """Merge small shards into shards of up to ``shard_tokens`` tokens; a new generation."""
    from pipelines.compact import plan_merges, run_compaction

    store = str(store)
    current = read_manifest(store)
    groups = plan_merges(current.shards, shard_tokens or BuildConfig().shard_tokens)
    if not any(len(g) > 1 for g in groups):
        log.info("nothing to compact: generation %d stays current", current.generation)
        return current
    p = beam.Pipeline(options=pipeline_options(beam_args))
    run_compaction(p, store, current, groups)
    _run(p)
    return read_manifest(store)
