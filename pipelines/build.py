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
from pipelines.dead_letter import WriteDeadLetters, read_dead_letters, summarize
from pipelines.dedupe import NAMESPACE, DropKnownDocuments
from pipelines.encode import EncodeShards
from pipelines.fit import FitTransform, load_fitted
from pipelines.index import FillShardIndex
from pipelines.options import pipeline_options
from pipelines.publish import Publish
from pipelines.readers import DEAD, ReadCorpus, list_corpus_files
from pipelines.sample import SampleStates
from pipelines.tokenize import Tokenize
from schemas import Manifest, ModelSpec, StoreFormatError, read_manifest
from schemas.manifest import CURRENT_FILE

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


def _run(p: beam.Pipeline) -> dict[str, int]:
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    return {c.key.metric.name: c.committed or c.attempted or 0 for c in counters["counters"]}


def _report(store: str, generation: int, counters: dict[str, int]) -> None:
    letters = read_dead_letters(store, generation)
    if letters:
        log.warning("%d input(s) skipped (%s); details in %s/dead_letter/gen-%06d.parquet",
                    len(letters), summarize(letters), store, generation)
    for name, n in sorted(counters.items()):
        if n:
            log.info("%s: %d", name.replace("_", " "), n)


def build_store(corpus: Corpus, store: str | os.PathLike, config: BuildConfig | None = None,
                beam_args: Sequence[str] | None = None) -> Manifest:
    """Build a new store from a corpus: sample, fit, encode, index, publish generation 1."""
    config = config or BuildConfig()
    store = str(store)
    if (Path(store) / CURRENT_FILE).exists():
        raise ValueError(f"{store} is already a store; use update to add documents")
    files = list_corpus_files(corpus, config.glob)
    model = describe_model(config)
    Path(store).mkdir(parents=True, exist_ok=True)
    generation = 1

    p = beam.Pipeline(options=pipeline_options(beam_args))
    docs = _read_documents(p, files, config, store, [], generation)
    num_keys = (
        docs
        | "KeysPerDoc" >> beam.Map(lambda d: len(d) - 1)
        | "TotalKeys" >> beam.CombineGlobally(sum)
    )
    fitted = (
        docs
        | "SampleStates" >> SampleStates(config)
        | "FitTransform" >> FitTransform(config, store, num_keys)
    )
    _ = (
        docs
        | "EncodeShards" >> EncodeShards(config, store, fitted)
        | "FillShardIndex" >> FillShardIndex(store, generation, fitted)
        | "Publish" >> Publish(store, generation, model, config.value_len, fitted,
                               note=config.note)
    )
    counters = _run(p)
    _report(store, generation, counters)
    if not (Path(store) / CURRENT_FILE).exists():
        letters = read_dead_letters(store, generation)
        raise ValueError(f"no usable documents in the corpus ({len(files)} file(s)); "
                         f"{len(letters)} input(s) skipped: {summarize(letters) or 'none'}")
    return read_manifest(store)


def update_store(corpus: Corpus, store: str | os.PathLike, config: BuildConfig | None = None,
                 beam_args: Sequence[str] | None = None) -> Manifest:
    """Encode only documents new to the store into new shards and publish the next generation.

    The store's transform, quantizer, d and N are reused (``config``'s are ignored); the model
    must be the one the store was built with.
    """
    store = str(store)
    current = read_manifest(store)
    config = dataclasses.replace(
        config or BuildConfig(model=current.model.name),
        dim=current.dim, value_len=current.value_len, index_kind=current.index.kind,
        nlist=current.index.nlist, nprobe=current.index.nprobe,
        **({"pq_m": current.index.pq_m, "pq_nbits": current.index.pq_nbits}
           if current.index.kind == "ivf_pq" else {}),
    )
    model = describe_model(config)
    if model.fingerprint != current.model.fingerprint:
        raise StoreFormatError(
            f"model {config.model!r} (fingerprint {model.fingerprint[:12]}) is not the model "
            f"this store was built with ({current.model.name!r}, "
            f"{current.model.fingerprint[:12]})")
    files = list_corpus_files(corpus, config.glob)
    fitted_value = load_fitted(store, current)
    generation = current.generation + 1

    p = beam.Pipeline(options=pipeline_options(beam_args))
    fitted = p | "FittedKeys" >> beam.Create([fitted_value])
    docs = _read_documents(p, files, config, store, [s.shard_id for s in current.shards],
                           generation)
    _ = (
        docs
        | "EncodeShards" >> EncodeShards(config, store, fitted)
        | "FillShardIndex" >> FillShardIndex(store, generation, fitted)
        | "Publish" >> Publish(store, generation, model, current.value_len, fitted,
                               base_shards=current.shards, parent=current.generation,
                               note=config.note or "update")
    )
    counters = _run(p)
    _report(store, generation, counters)
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
