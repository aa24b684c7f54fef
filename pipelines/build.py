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

import apache_beam as beam

from pipelines.config import BuildConfig
from pipelines.dead_letter import (
    DEAD_LETTER_DIR,
    WriteDeadLetters,
    read_dead_letters,
    summarize,
)
from pipelines.dedupe import NAMESPACE, FindDroppedSources
from pipelines.encode import ENCODED_TOKENS, EncodeShards, EncodeTiming
from pipelines.fit import (
    INDEX_DIR,
    TRANSFORM_DIR,
    FitTransform,
    TrainIndex,
    fitted_from_specs,
    load_fitted,
)
from pipelines.index import FillShardIndex
from pipelines.journal import (
    JOURNAL_DIR,
    RunJournal,
    config_settings,
    recorded_shards,
    run_dirs,
    run_info,
    run_key,
)
from pipelines.options import pipeline_options
from pipelines.publish import RecordResult, commit_generation
from pipelines.readers import DEAD, ReadCorpus, batch_files, list_corpus_files
from pipelines.sample import SampleStates
from pipelines.stage_clock import LauncherClock, stage_costs
from pipelines.tokenize import Tokenize
from schemas import Manifest, ModelSpec, StoreFormatError, read_manifest
from schemas.commit import (
    CommitConflictError,
    manifest_relpath,
    newest_generation,
    update_current,
)
from schemas.integrity import VERIFIED_DIR
from schemas.layout import ARCHIVE_DIR, CURRENT_FILE, MANIFEST_DIR, SHARDS_DIR
from schemas.shard_io import read_docs
from schemas.storage import StoreIO, staged, store_io

log = logging.getLogger(__name__)

Corpus = str | os.PathLike | Iterable[str | os.PathLike]


def describe_model(config: BuildConfig, name: str | None = None) -> ModelSpec:
    """Load the model once in the launcher to fingerprint it for the manifest, where it is
    recorded under ``name`` (default: ``config.model``), the name the user gave."""
    from dresd.models import eos_token_id, load_model, model_fingerprint, tokenizer_fingerprint

    model, tokenizer = load_model(config.model, "cpu", "float32")
    cfg = model.config
    return ModelSpec(
        name=str(name or config.model),
        fingerprint=model_fingerprint(model, tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        eos_token_id=eos_token_id(model, tokenizer),
    )


# Everything a store directory holds at its top level (a failed build may leave some of it).
STORE_ENTRIES = {CURRENT_FILE, MANIFEST_DIR, SHARDS_DIR, TRANSFORM_DIR, INDEX_DIR, DEAD_LETTER_DIR,
                 JOURNAL_DIR, VERIFIED_DIR, ARCHIVE_DIR}


def _absolute_model(config: BuildConfig) -> BuildConfig:
    """A model given as a relative directory, made absolute here at the launcher: workers
    resolve paths in their own working directory, so every runner must get the same path."""
    if config.model != "default" and os.path.exists(config.model):
        return dataclasses.replace(config, model=os.path.abspath(config.model))
    return config


def _check_new_store(io: StoreIO) -> None:
    """A new store goes into a new or empty directory, or one a failed build left behind."""
    if newest_generation(io) > 0:
        raise ValueError(f"{io.where()} is already a store; use update to add documents")
    names = io.listdir("")
    foreign = sorted(n for n in names if n not in STORE_ENTRIES and not n.startswith("."))
    if foreign:
        raise ValueError(f"{io.where()} holds files that are not a store's "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                         "build writes into a new or empty directory, named first, before the "
                         "corpus")


def _corpus_files(corpus: Corpus, glob: str, io: StoreIO) -> list[str]:
    """The corpus files, none of which may lie inside the store (swapped arguments)."""
    files = list_corpus_files(corpus, glob)
    inside = [f for f in files if io.contains(f)]
    if inside:
        raise ValueError(f"{len(inside)} corpus file(s) lie inside the store directory "
                         f"{io.where()} (e.g. {inside[0]}); the store is the first argument, "
                         "the corpus follows")
    return files


# A batch of files holds about this many bytes per token of ``shard_tokens`` (source code and
# prose run 3-5 bytes a token), so one batch makes about one shard, a little under the target.
BATCH_BYTES_PER_TOKEN = 3


def _read_documents(p, files, config: BuildConfig, store: str, known_shards: list[str],
                    generation: int):
    """(tokenized new documents, the first read's documents); dead letters written.

    The corpus is read twice, in batches of files of about one shard: the first read finds the
    documents to drop (repeated, or already in the store) and feeds the transform's sample;
    the second skips the dropped ones and streams the rest through tokenization into the
    encoder, one batch at a time. Reading again costs little next to tokenizing and encoding,
    and no step holds the corpus (pipelines.dedupe).
    """
    batches = batch_files(files, config.shard_tokens * BATCH_BYTES_PER_TOKEN)
    fields = (config.prompt_field, config.response_field, config.max_doc_bytes)
    first = p | "ReadCorpus" >> ReadCorpus(batches, *fields)
    dropped = first.docs | "FindDropped" >> FindDroppedSources(store, known_shards)
    second = p | "ReadNew" >> ReadCorpus(batches, *fields, dropped=dropped)
    tokenized = second.docs | "Tokenize" >> Tokenize(config.model)
    _ = (
        (first[DEAD], tokenized[DEAD])
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> WriteDeadLetters(store, generation)
    )
    return tokenized.tokenized, first.docs


@dataclasses.dataclass
class RunMetrics:
    """The builder's Beam metrics of one run, summed (counters) and merged (distributions)
    over steps and workers."""

    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    distributions: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def encode(self) -> EncodeTiming | None:
        return EncodeTiming.from_metrics(self.counters, self.distributions)

    @property
    def stages(self):
        """{stage: StageCost} of the stages the workers timed (pipelines.stage_clock)."""
        return stage_costs(self.distributions)


def run_pipeline(p: beam.Pipeline) -> RunMetrics:
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


def _local_runner(beam_args: Sequence[str] | None) -> bool:
    runner = ""
    for i, a in enumerate(beam_args or []):
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(beam_args):
            runner = beam_args[i + 1]
    return runner.rsplit(".", 1)[-1] in ("", "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner")


def _check_device(config: BuildConfig, beam_args: Sequence[str] | None) -> None:
    """On a local runner the encoder runs here: a CUDA device must exist (on a cluster the
    workers have the GPUs, not the launcher)."""
    if config.device.startswith("cuda") and _local_runner(beam_args):
        from dresd.models import check_device

        check_device(config.device)


def _launcher_clock(stats: dict | None) -> LauncherClock:
    clock = LauncherClock()
    if stats is not None:
        stats["launcher"] = clock.costs
    return clock


def start_journal(store: StoreIO, kind: str, parent: int, files: list[str], settings: dict,
                   model: str) -> RunJournal:
    journal = RunJournal(store, kind, parent, run_key(kind, parent, files, settings, model))
    try:
        return journal.start()
    except PermissionError:
        raise PermissionError(f"store directory {store.where()} is not writable") from None


def commit_run(journal: RunJournal, generation: int, model: ModelSpec, value_len: int,
               transform, index, shards: tuple, parent: Manifest | None, note: str) -> Manifest:
    manifest = commit_generation(journal.store, generation, model, value_len, transform, index,
                                 shards, parent, note)
    journal.finish(manifest.shards)
    return manifest


def completed_earlier(io: StoreIO, parent: int, key: str) -> Manifest | None:
    """The generation a crashed run of this very command committed before it could finish
    (its recorded shards are all in the generation after ``parent``), CURRENT repaired and the
    run's journal removed; None otherwise."""
    generation = parent + 1
    if not io.exists(manifest_relpath(generation)):
        return None
    # A shard is identified with its lists: a re-index records the shards it re-filled.
    named = {(s.shard_id, s.index) for s in read_manifest(io, generation).shards}
    for run in run_dirs(io):
        info = run_info(io, run)
        if not info or info.get("key") != key or info.get("parent") != parent:
            continue
        recorded = {(r["shard"].shard_id, r["shard"].index) for r in recorded_shards(io, run)}
        if recorded and recorded <= named:
            update_current(io, newest_generation(io))
            io.remove(run)
            log.info("generation %d was committed by an earlier run of this command; "
                     "completed it", generation)
            return read_manifest(io)
    return None


def _encode_and_run(p, docs, config: BuildConfig, fitted, journal: RunJournal, generation: int,
                    vocab_size: int, stats: dict | None, train: bool = False) -> None:
    """Encode, index and record the new documents' shards; run the pipeline and report.

    With ``train``, ``fitted`` holds the transform only and the index quantizer is trained on
    keys sampled from the encoded shards before their lists are filled.
    """
    store = journal.store
    shards = docs | "EncodeShards" >> EncodeShards(config, store, fitted)
    if train:
        fitted = shards | "TrainIndex" >> TrainIndex(config, store, fitted)
    _ = (
        shards
        | "FillShardIndex" >> FillShardIndex(store, generation, fitted, vocab_size,
                                             config.archive)
        | "Record" >> RecordResult(journal, fitted)
    )
    _report(store, generation, run_pipeline(p), stats)


def build_store(corpus: Corpus, store: str | os.PathLike, config: BuildConfig | None = None,
                beam_args: Sequence[str] | None = None, stats: dict | None = None) -> Manifest:
    """Build a new store from a corpus: sample states and fit the transform, encode shards,
    train the index quantizer on their keys, fill each shard's lists, commit generation 1.

    A rerun after a crash completes the build: shards (and the fitted transform) that the
    crashed run wrote and checksummed are reused (pipelines.journal). ``stats``, when given,
    receives the run's ``RunMetrics`` under ``"metrics"`` (its ``encode`` timing and stage
    costs included) and the launcher's own stages under ``"launcher"`` (pipelines.stage_clock).
    """
    config = config or BuildConfig()
    given_model, config = config.model, _absolute_model(config)
    store = store_io(store)
    store.check_writable(must_exist=False)
    clock = _launcher_clock(stats)
    with clock("list"):
        files = _corpus_files(corpus, config.glob, store)
    _check_device(config, beam_args)
    with clock("describe_model"):
        model = describe_model(config, given_model)
    key = run_key("build", 0, files, config_settings(config), model.fingerprint)
    if done := completed_earlier(store, 0, key):
        return done
    _check_new_store(store)
    generation = 1
    journal = start_journal(store, "build", 0, files, config_settings(config),
                             model.fingerprint)
    committed = False
    try:
        adopted = journal.adopt()
        p = beam.Pipeline(options=pipeline_options(beam_args))
        docs, first_read = _read_documents(p, files, config, store,
                                           [s.shard_id for s in adopted.shards], generation)
        train = adopted.transform is None
        if train:
            fitted = (
                first_read
                | "SampleStates" >> SampleStates(config)
                | "FitTransform" >> FitTransform(config, store)
            )
        else:
            fitted = p | "FittedKeys" >> beam.Create(
                [fitted_from_specs(store, adopted.transform, adopted.index)])
        _encode_and_run(p, docs, config, fitted, journal, generation, model.vocab_size, stats,
                        train)
        result = journal.read_result()
        shards = tuple(adopted.shards) + result.shards
        if not shards:
            letters = read_dead_letters(store, generation)
            raise ValueError(f"no usable documents in the corpus ({len(files)} file(s)); "
                             f"{len(letters)} input(s) skipped: {summarize(letters) or 'none'}")
        with clock("commit"):
            manifest = commit_run(journal, generation, model, config.value_len,
                                  result.transform or adopted.transform,
                                  result.index or adopted.index, shards, None, config.note)
        committed = True
        return manifest
    finally:
        journal.stop(ended=not committed)


def update_store(corpus: Corpus, store: str | os.PathLike, config: BuildConfig | None = None,
                 beam_args: Sequence[str] | None = None, stats: dict | None = None,
                 rebase: bool = False) -> Manifest:
    """Encode only documents new to the store into new shards and commit the next generation.

    The store's transform, quantizer, d and N are reused (``config``'s are ignored); the model
    must be the one the store was built with. A rerun after a crash reuses the shards the
    crashed run wrote and checksummed. ``stats`` as for ``build_store``.

    When another writer commits first: CommitConflictError (rerun the update), or with
    ``rebase`` the new shards are committed on top of that writer's generation when that is
    safe (``_commit_update``).
    """
    store = store_io(store)
    store.check_writable(must_exist=True)
    current = read_manifest(store)
    config = dataclasses.replace(
        config or BuildConfig(model=current.model.name),
        dim=current.dim, value_len=current.value_len, index_kind=current.index.kind,
        archive=current.archive is not None,
        nlist=current.index.nlist, nprobe=current.index.nprobe, pq_m=current.index.pq_m,
        **({"pq_nbits": current.index.pq_nbits} if current.index.kind == "ivf_pq" else {}),
    )
    given_model, config = config.model, _absolute_model(config)
    _check_device(config, beam_args)
    clock = _launcher_clock(stats)
    with clock("describe_model"):
        model = describe_model(config, given_model)
    if model.fingerprint != current.model.fingerprint:
        raise StoreFormatError(
            f"model {config.model!r} (fingerprint {model.fingerprint[:12]}) is not the model "
            f"this store was built with ({current.model.name!r}, "
            f"{current.model.fingerprint[:12]})")
    with clock("list"):
        files = _corpus_files(corpus, config.glob, store)
    fitted_value = load_fitted(store, current)
    generation = current.generation + 1
    journal = start_journal(store, "update", current.generation, files,
                             config_settings(config), model.fingerprint)
    committed = False
    try:
        adopted = journal.adopt(current.transform, current.index)
        known = [s.shard_id for s in current.shards] + [s.shard_id for s in adopted.shards]
        p = beam.Pipeline(options=pipeline_options(beam_args))
        fitted = p | "FittedKeys" >> beam.Create([fitted_value])
        docs, _ = _read_documents(p, files, config, store, known, generation)
        _encode_and_run(p, docs, config, fitted, journal, generation, model.vocab_size, stats)
        new = tuple(adopted.shards) + journal.read_result().shards
        if not new:
            log.info("no new shards: nothing published")
            journal.finish(())
            committed = True
            return current
        with clock("commit"):
            manifest = _commit_update(journal, current, model, new, config.note or "update",
                                      MAX_REBASES if rebase else 0)
        committed = True
        return manifest
    finally:
        journal.stop(ended=not committed)


MAX_REBASES = 8


def _doc_ids(store: str, shards) -> set[str]:
    out: set[str] = set()
    for s in shards:
        with staged(store, [s.docs.path]) as root:
            out.update(read_docs(root, s.shard_id).column("doc_id").to_pylist())
    return out


def _commit_update(journal: RunJournal, current: Manifest, model: ModelSpec, new: tuple,
                   note: str, rebases: int) -> Manifest:
    """Commit an update's new shards on top of ``current``; when another writer committed
    first (and ``rebases`` allows), on top of the newest generation instead, if that is safe.

    Safe means: the newest generation uses the same model, transform and quantizer, and none of
    this update's documents is in a shard added since ``current`` (this run removed only the
    documents ``current`` holds). Then the shards of both writers end up in one generation:
    concurrent updates of disjoint documents both land, and an update racing a compaction
    lands on top of it. Otherwise CommitConflictError, and nothing is committed by this run.
    """
    store = journal.store
    parent = current
    mine: set[str] | None = None
    for attempt in range(rebases + 1):
        try:
            return commit_run(journal, parent.generation + 1, model, current.value_len,
                              current.transform, current.index, parent.shards + new,
                              parent, note)
        except CommitConflictError as e:
            if attempt == rebases:
                raise
            latest = read_manifest(store)
            if (latest.model.fingerprint, latest.transform, latest.index) != (
                    current.model.fingerprint, current.transform, current.index):
                raise CommitConflictError(
                    f"{e}; generation {latest.generation} was built with another model, "
                    "transform or quantizer, so this update cannot join it") from None
            known = {sh.shard_id for sh in current.shards}
            added = [sh for sh in latest.shards if sh.shard_id not in known]
            mine = _doc_ids(store, new) if mine is None else mine
            both = mine & _doc_ids(store, added)
            if both:
                raise CommitConflictError(
                    f"{e}; {len(both)} of this update's documents were added by that writer "
                    "too, so its shards cannot be added beside them: nothing was committed by "
                    "this run (rerun the update to add what is still missing)") from None
            log.info("generation %d was committed by another writer; adding this update's "
                     "%d shard(s) on top of it", latest.generation, len(new))
            parent = latest
    raise AssertionError("unreachable")


def compact_store(store: str | os.PathLike, shard_tokens: int | None = None,
                  beam_args: Sequence[str] | None = None) -> Manifest:
    """Merge small shards into shards of up to ``shard_tokens`` tokens; a new generation."""
    from pipelines.compact import plan_merges, run_compaction

    store = store_io(store)
    store.check_writable(must_exist=True)
    current = read_manifest(store)
    groups = plan_merges(current.shards, shard_tokens or BuildConfig().shard_tokens)
    if not any(len(g) > 1 for g in groups):
        log.info("nothing to compact: generation %d stays current", current.generation)
        return current
    plan = [[s.shard_id for s in g] for g in groups]
    journal = start_journal(store, "compact", current.generation, [], {"groups": plan},
                             current.model.fingerprint)
    committed = False
    try:
        p = beam.Pipeline(options=pipeline_options(beam_args))
        run_compaction(p, store, current, groups, journal)
        run_pipeline(p)
        merged = journal.read_result().shards
        kept = tuple(g[0] for g in groups if len(g) == 1)
        manifest = commit_run(journal, current.generation + 1, current.model, current.value_len,
                              current.transform, current.index, kept + merged,
                              current, "compact")
        committed = True
        return manifest
    finally:
        journal.stop(ended=not committed)
