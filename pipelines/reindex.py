"""``dresd reindex``: a new index for a store from its key archive, without the model.

One Beam pipeline: keys sampled from the archive's fragments train a new quantizer
(``TrainIndex``, as in a build), then every shard's inverted lists are filled from its own
fragment (``FillShardIndex``), written beside the shard's files as ``ivf-<quantizer>.lists`` so
that the lists an older generation names are never replaced. The launcher commits the next
generation: the same shards, transform and archive version, the new quantizer and lists. A
crash leaves the current generation as it was; rerunning the command completes the re-index.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import apache_beam as beam

from pipelines.build import commit_run, completed_earlier, run_pipeline, start_journal
from pipelines.config import BuildConfig
from pipelines.documents import WrittenShard
from pipelines.faults import maybe_fail
from pipelines.fit import FittedKeys, TrainIndex, load_fitted
from pipelines.index import FillShardIndex
from pipelines.journal import run_key
from pipelines.options import pipeline_options
from pipelines.publish import RecordResult
from schemas import Manifest, StoreFormatError, read_manifest
from schemas.storage import store_io

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReindexSettings:
    """What a re-index may change; None or 0 keeps (or, for nlist, pq_m and train_size,
    re-derives as a build would) the store's setting."""

    index_kind: str | None = None
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int | None = None
    nprobe: int | None = None
    train_size: int = 0
    seed: int = 0

    def config(self, current: Manifest) -> BuildConfig:
        """The build settings of the new index (validated as a build's are)."""
        kind = self.index_kind or current.index.kind
        return BuildConfig(
            model=current.model.name, dim=current.dim, value_len=current.value_len,
            index_kind=kind, nlist=self.nlist, pq_m=self.pq_m,
            pq_nbits=self.pq_nbits or current.index.pq_nbits or 8,
            nprobe=self.nprobe or current.index.nprobe, train_size=self.train_size,
            seed=self.seed, progress=False)


def _written(manifest: Manifest) -> list[WrittenShard]:
    missing = [s.shard_id for s in manifest.shards if s.archive is None]
    if missing:
        raise StoreFormatError(
            f"{len(missing)} of the store's {len(manifest.shards)} shards have no key archive "
            f"(e.g. {missing[0]}; built with --no-archive, or before archives): re-indexing "
            "needs every key; rebuild the store from its corpus with the model instead")
    return [WrittenShard(shard_id=s.shard_id, num_docs=s.num_docs, num_tokens=s.num_tokens,
                         num_keys=s.num_keys, archive=s.archive) for s in manifest.shards]


def _record_trained(fitted: FittedKeys) -> FittedKeys:
    maybe_fail("after_reindex_train")
    return fitted


def reindex_store(store: str | os.PathLike, settings: ReindexSettings | None = None,
                  beam_args: Sequence[str] | None = None) -> Manifest:
    """Train a new quantizer on keys sampled from the archive, fill every shard's lists with
    it, and commit them as the next generation; returns its manifest."""
    settings = settings or ReindexSettings()
    io = store_io(store)
    io.check_writable(must_exist=True)
    current = read_manifest(io)
    recorded = dataclasses.asdict(settings)

    def key(parent: int) -> str:
        return run_key("reindex", parent, [], recorded, current.model.fingerprint)

    # A run of this command that crashed after its commit made the current generation (or
    # the one after it, when CURRENT was not updated yet): complete that one.
    for parent in dict.fromkeys((current.generation, current.parent_generation)):
        if parent and (done := completed_earlier(io, parent, key(parent))):
            return done
    shards = _written(current)  # every shard's keys are in the archive
    config = settings.config(current)  # checked as a build's settings are
    journal = start_journal(io, "reindex", current.generation, [], recorded,
                             current.model.fingerprint)
    committed = False
    try:
        fitted = dataclasses.replace(load_fitted(io, current), quantizer=None, index_spec=None)
        p = beam.Pipeline(options=pipeline_options(beam_args))
        transform_only = p | "Transform" >> beam.Create([fitted])
        written = p | "Shards" >> beam.Create(shards)
        trained = (written | "TrainIndex" >> TrainIndex(config, io, transform_only)
                   | "Trained" >> beam.Map(_record_trained))
        _ = (
            written
            | "FillShardIndex" >> FillShardIndex(io, current.generation + 1, trained,
                                                 current.model.vocab_size, reindex=True)
            | "Record" >> RecordResult(journal, trained)
        )
        run_pipeline(p)
        result = journal.read_result()
        filled = {s.shard_id: s for s in result.shards}
        if set(filled) != {s.shard_id for s in current.shards}:
            raise RuntimeError(f"the re-index filled {len(filled)} of "
                               f"{len(current.shards)} shards")
        new = tuple(dataclasses.replace(filled[s.shard_id], generation_added=s.generation_added)
                    for s in current.shards)
        index = result.index
        note = (f"reindex {index.kind} nlist={index.nlist} nprobe={index.nprobe}"
                + (f" pq_m={index.pq_m}" if index.pq_m else ""))
        manifest = commit_run(journal, current.generation + 1, current.model, current.value_len,
                              current.transform, index, new, current, note)
        committed = True
        log.info("re-indexed generation %d as %d: %s", current.generation,
                 manifest.generation, note)
        return manifest
    finally:
        journal.stop(ended=not committed)
