"""Publish a manifest generation: the last step, after every shard and index is complete."""

from __future__ import annotations

import logging

import apache_beam as beam

from schemas import Manifest, ModelSpec, ShardInfo, write_manifest

log = logging.getLogger(__name__)

LAYER = -1  # keys are final-layer states after the final norm


def publish_manifest(new_shards: list[ShardInfo], fitted, store: str, generation: int,
                     model: ModelSpec, value_len: int, base_shards: tuple[ShardInfo, ...],
                     parent: int | None, note: str) -> int:
    """Write generation ``generation`` naming ``base_shards`` plus the new ones; 0 if no change.

    Nothing new is not an error here, so the rest of the pipeline (the dead-letter report)
    completes; the launcher turns an empty first build into one.
    """
    if not new_shards:
        log.info("no new shards: nothing published")
        return 0
    manifest = Manifest(
        generation=generation,
        model=model,
        layer=LAYER,
        value_len=value_len,
        transform=fitted.transform_spec,
        index=fitted.index_spec,
        shards=tuple(base_shards) + tuple(sorted(new_shards, key=lambda s: s.shard_id)),
        parent_generation=parent,
        note=note,
    )
    write_manifest(store, manifest)
    return generation


class Publish(beam.PTransform):
    """ShardInfos -> the new generation number (0 when nothing changed), manifest written."""

    def __init__(self, store: str, generation: int, model: ModelSpec, value_len: int, fitted,
                 base_shards: tuple[ShardInfo, ...] = (), parent: int | None = None,
                 note: str = ""):
        super().__init__()
        self.args = dict(store=str(store), generation=generation, model=model,
                         value_len=value_len, base_shards=tuple(base_shards), parent=parent,
                         note=note)
        self.fitted = fitted

    def expand(self, shards):
        return (
            shards
            | "Collect" >> beam.combiners.ToList()
            | "WriteManifest" >> beam.Map(publish_manifest, beam.pvalue.AsSingleton(self.fitted),
                                          **self.args)
        )
