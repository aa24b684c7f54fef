"""Publishing a generation: the pipeline records its result, the launcher commits it.

The pipeline's last steps record every finished shard in the run journal and write the run's
result once (``RecordResult``); after the pipeline the launcher creates the manifest of
generation parent + 1 only if absent, the commit point (``commit_generation``, protocol in
schemas.commit), right after the key archive's version (pipelines.archive), then updates the
``CURRENT`` hint and cleans up the run's own files.
"""

from __future__ import annotations

import logging

import apache_beam as beam

from pipelines.archive import commit_archive, discard_version
from pipelines.documents import FilledShard
from pipelines.faults import maybe_fail
from pipelines.journal import RunJournal
from schemas import IndexSpec, Manifest, ModelSpec, ShardInfo, TransformSpec
from schemas.commit import CommitConflictError, commit_manifest, update_current
from schemas.manifest import manifest_bytes
from schemas.storage import StoreIO

log = logging.getLogger(__name__)

LAYER = -1  # keys are final-layer states after the final norm


def commit_generation(store: StoreIO, generation: int, model: ModelSpec, value_len: int,
                      transform: TransformSpec, index: IndexSpec, shards: tuple[ShardInfo, ...],
                      parent: Manifest | None, note: str) -> Manifest:
    """Commit the archive version of ``shards`` (the parent's when they hold the same
    fragments), then ``generation`` naming it (CommitConflictError if another writer did),
    then the hint.

    The manifest is the commit point: a crash before it leaves an archive version no manifest
    names, which readers never open and gc removes; a crash after it leaves the generation
    committed whole, its archive included."""
    archive = commit_archive(store, tuple(shards), transform.dim,
                             parent.archive if parent else None,
                             parent.shards if parent else ())
    manifest = Manifest(generation=generation, model=model, layer=LAYER, value_len=value_len,
                        transform=transform, index=index, shards=tuple(shards),
                        parent_generation=parent.generation if parent else None, note=note,
                        archive=archive)
    data = manifest_bytes(manifest)
    maybe_fail("before_manifest")
    try:
        commit_manifest(store, generation, data)
    except CommitConflictError:
        # Another writer committed this generation: ours was not, so nor is its archive
        # version (it stays invisible to dresd readers either way; this spares a raw Lance
        # reader of the latest version the sight of it until gc).
        if archive is not None and archive != (parent.archive if parent else None):
            discard_version(store, archive)
        raise
    maybe_fail("after_manifest")
    update_current(store, generation)
    maybe_fail("after_current")
    return manifest


def _write_result(filled: list[FilledShard], fitted, journal: RunJournal) -> int:
    return journal.write_result(filled, fitted)


class RecordResult(beam.PTransform):
    """FilledShards -> recorded one by one in the run journal, then the run's result written
    once (the shards of every successful bundle and the fitted keys); a shard filled with
    another quantizer than ``fitted``'s stops the run (pipelines.journal.check_filled_with)."""

    def __init__(self, journal: RunJournal, fitted):
        super().__init__()
        self.journal = journal
        self.fitted = fitted  # singleton PCollection of FittedKeys (None: no documents)

    def expand(self, shards):
        fitted = beam.pvalue.AsSingleton(self.fitted)
        recorded = shards | "RecordShard" >> beam.Map(
            lambda info, f, j: j.record_shard(info, f), fitted, self.journal)
        _ = self.fitted | "RecordFitted" >> beam.Map(lambda f, j: j.record_fitted(f),
                                                     self.journal)
        return (
            recorded
            | "Collect" >> beam.combiners.ToList()
            | "WriteResult" >> beam.Map(_write_result, fitted, self.journal)
        )
