"""Encode documents into shards: token stream, documents, and one transformed key per position.

The model loads once per worker process, shared with the sampling step (``pipelines.encoder``).
Documents are buffered until they hold ``shard_tokens`` tokens (or the bundle ends), then encoded
longest-window-first under the token budget and written as one shard. A key exists for every
position t with t + 1 < length: its vector is transform(h_t) in float16, written to the shard's
fragment of the key archive (pipelines.archive), from which the fill step encodes it into the
shard's inverted lists, filed under the token at t + 1.

Every worker reports its timings as Beam metrics (see ``EncodeTiming``), so a launcher on any
runner can tell the encode throughput without the model load, tokenization or the other stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from pipelines.archive import archive_table, write_fragment
from pipelines.config import BuildConfig
from pipelines.documents import TokenizedDoc, WrittenShard
from pipelines.faults import maybe_fail
from pipelines.heap import release_free_heap
from pipelines.stage_clock import NAMESPACE, stage_clock
from schemas.shard_io import KEY_DTYPE, key_positions
from schemas.storage import staged, store_io

# Distributions hold ints: wall-clock instants in epoch milliseconds, durations in milliseconds.
ENCODED_TOKENS = "encoded_tokens"
ENCODE_FIRST_MS = "encode_first_doc_ms"  # a bundle's first document reached the encoder
ENCODE_DONE_MS = "encode_shard_done_ms"  # a shard's files were written
ENCODE_FORWARD_MS = "encode_forward_ms"  # model forward + projection, per shard
ENCODE_CPU_MS = "encode_cpu_ms"  # process CPU time from a bundle's first document, per shard
ENCODER_SETUP_MS = "encoder_setup_ms"  # model load, per worker process (sampling or encoding)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class EncodeTiming:
    """The encode stage of one pipeline run, from its metrics.

    ``stage_s`` runs from the first document any encoder received to the last shard written
    (forward, projection, buffering and the Arrow and key writes; not the model load, which
    ``setup_s`` sums over workers, nor tokenization, sampling, fitting or index filling).
    ``cpu_s`` is the CPU time of the encoders' processes over the same span, every thread
    counted (torch's and Beam's): on a shared machine it is steadier than wall time, and it
    is the stage's own cost when each worker process runs one encoder at a time.
    """

    tokens: int
    shards: int
    stage_s: float
    forward_s: float
    cpu_s: float
    setup_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.stage_s if self.stage_s > 0 else 0.0

    @classmethod
    def from_metrics(cls, counters: dict[str, int], distributions: dict[str, dict]):
        """None when nothing was encoded (or the runner reported no metrics)."""
        first, done = distributions.get(ENCODE_FIRST_MS), distributions.get(ENCODE_DONE_MS)
        if not counters.get(ENCODED_TOKENS) or not first or not done:
            return None

        def total(name):
            return distributions.get(name, {}).get("sum", 0) / 1000

        return cls(tokens=counters[ENCODED_TOKENS], shards=done["count"],
                   stage_s=(done["max"] - first["min"]) / 1000, forward_s=total(ENCODE_FORWARD_MS),
                   cpu_s=total(ENCODE_CPU_MS), setup_s=total(ENCODER_SETUP_MS))

    def describe(self) -> str:
        return (f"encoded {self.tokens} tokens into {self.shards} shard(s) in {self.stage_s:.1f} s "
                f"({self.tokens_per_s:.0f} tok/s; forward {self.forward_s:.1f} s, "
                f"model load {self.setup_s:.1f} s)")


def shard_keys(docs: list[TokenizedDoc], states: np.ndarray):
    """ShardData for documents laid back to back with per-token key vectors (one row per
    position; a document's last position has no key and its row is never indexed)."""
    from schemas.shard_io import ShardData

    lengths = np.array([len(d) for d in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate([d.tokens for d in docs]).astype(np.int32)
    if len(states) != len(tokens):
        raise ValueError(f"{len(states)} states for {len(tokens)} tokens")
    return ShardData(
        tokens=tokens,
        doc_ids=[d.doc_id for d in docs],
        sources=[d.source for d in docs],
        starts=starts,
        lengths=lengths.astype(np.int32),
        vectors=states,
    )


def archive_rows(shard_id: str, data) -> pa.Table:
    """The shard's archive rows: the key of every position that has one (ShardData)."""
    positions = key_positions(data.starts, data.lengths, len(data.tokens))
    doc_of = np.repeat(np.arange(len(data.doc_ids)), data.lengths)[positions]
    return archive_table(shard_id, positions, data.tokens[positions + 1],
                         np.asarray(data.doc_ids, object)[doc_of], data.vectors[positions])


class EncodeShardsFn(beam.DoFn):
    def __init__(self, config: BuildConfig, store: str):
        self.config = config
        self.store = store

    def setup(self):
        from pipelines.encoder import EncoderSpec, acquire_encoder, claim_load_ms

        # The process's one encoder, shared with the sampling step (pipelines.encoder). Its
        # load time is reported by whichever step loaded it; metrics reported in setup are
        # lost, so the first bundle reports it.
        self.model = acquire_encoder(EncoderSpec.of(self.config))
        self.setup_ms = claim_load_ms(self.model)

    def start_bundle(self):
        self.buffer: list[TokenizedDoc] = []
        self.buffered = 0
        self.fitted = None
        self.started = False

    def process(self, doc: TokenizedDoc, fitted):
        if not self.started:
            self.started = True
            self.cpu_mark = time.process_time()
            Metrics.distribution(NAMESPACE, ENCODE_FIRST_MS).update(_now_ms())
            if self.setup_ms is not None:
                Metrics.distribution(NAMESPACE, ENCODER_SETUP_MS).update(self.setup_ms)
                self.setup_ms = None
        # Side inputs are not passed to finish_bundle, so keep the one seen here.
        self.fitted = fitted
        self.buffer.append(doc)
        self.buffered += len(doc)
        if self.buffered >= self.config.shard_tokens:
            yield self._write_shard()

    def finish_bundle(self):
        if self.buffer:
            yield beam.transforms.window.GlobalWindows.windowed_value(self._write_shard())

    def _write_shard(self) -> WrittenShard:
        from pipelines.forward import encode_stream
        from schemas.shard_io import write_shard

        docs, self.buffer, self.buffered = self.buffer, [], 0
        transform = self.fitted.transform
        start = time.perf_counter()
        with stage_clock("encode_forward"):
            states = encode_stream(
                self.model, [d.tokens for d in docs], transform.dim, transform.torch_apply,
                KEY_DTYPE, self.config.batch_tokens, self.config.max_len, self.config.progress,
            )
        Metrics.distribution(NAMESPACE, ENCODE_FORWARD_MS).update(
            int((time.perf_counter() - start) * 1000))
        with stage_clock("encode_write"):
            data = shard_keys(docs, states)
            with staged(self.store) as root:  # a remote store: written here, then uploaded
                shard_id = write_shard(root, data)
                fragment = write_fragment(root, archive_rows(shard_id, data))
        maybe_fail("after_shard_write")
        written = WrittenShard(shard_id=shard_id, num_docs=len(docs), num_tokens=len(data.tokens),
                               num_keys=len(data.tokens) - len(docs), archive=fragment)
        del docs, states, data
        release_free_heap()  # the next shard's buffers differ in size: see pipelines.heap
        Metrics.counter(NAMESPACE, ENCODED_TOKENS).inc(written.num_tokens)
        Metrics.distribution(NAMESPACE, ENCODE_DONE_MS).update(_now_ms())
        cpu, self.cpu_mark = self.cpu_mark, time.process_time()
        Metrics.distribution(NAMESPACE, ENCODE_CPU_MS).update(int((self.cpu_mark - cpu) * 1000))
        return written


class EncodeShards(beam.PTransform):
    """TokenizedDocs -> WrittenShards (tokens, docs and keys on disk; index not yet)."""

    def __init__(self, config: BuildConfig, store: str, fitted):
        super().__init__()
        self.config = config
        self.store = store_io(store)
        self.fitted = fitted  # singleton PCollection of FittedKeys

    def expand(self, docs):
        return docs | "Encode" >> beam.ParDo(
            EncodeShardsFn(self.config, self.store), beam.pvalue.AsSingleton(self.fitted))
