"""Encode documents into shards: token stream, documents, and one transformed key per position.

The model loads once per worker (``setup``). Documents are buffered until they hold
``shard_tokens`` tokens (or the bundle ends), then encoded longest-window-first under the token
budget and written as one shard. A key exists for every position t with t + 1 < length: its
vector is transform(h_t) in float16, ``pos`` its offset in the shard's token stream, and
``next_token`` the token at pos + 1.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.config import BuildConfig
from pipelines.documents import TokenizedDoc, WrittenShard


def shard_keys(docs: list[TokenizedDoc], states: np.ndarray):
    """(ShardData fields) for documents laid back to back with per-token key vectors."""
    from schemas.shard_io import ShardData

    lengths = np.array([len(d) for d in docs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate([d.tokens for d in docs]).astype(np.int32)
    has_next = np.ones(len(tokens), bool)
    has_next[starts + lengths - 1] = False  # a document's last token predicts nothing stored
    pos = np.flatnonzero(has_next).astype(np.int64)
    return ShardData(
        tokens=tokens,
        doc_ids=[d.doc_id for d in docs],
        sources=[d.source for d in docs],
        starts=starts,
        lengths=lengths.astype(np.int32),
        vectors=states[pos],
        pos=pos,
        next_token=tokens[pos + 1],
    )


class EncodeShardsFn(beam.DoFn):
    def __init__(self, config: BuildConfig, store: str):
        self.config = config
        self.store = store

    def setup(self):
        from pipelines.forward import HiddenStateModel

        self.model = HiddenStateModel(self.config.model, self.config.device, self.config.dtype)

    def start_bundle(self):
        self.buffer: list[TokenizedDoc] = []
        self.buffered = 0
        self.fitted = None

    def process(self, doc: TokenizedDoc, fitted):
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
        states = encode_stream(
            self.model, [d.tokens for d in docs], transform.dim, transform.torch_apply,
            np.float16, self.config.batch_tokens, self.config.max_len, self.config.progress,
        )
        data = shard_keys(docs, states)
        shard_id = write_shard(self.store, data)
        return WrittenShard(shard_id=shard_id, num_docs=len(docs), num_tokens=len(data.tokens),
                            num_keys=len(data.pos))


class EncodeShards(beam.PTransform):
    """TokenizedDocs -> WrittenShards (tokens, docs and keys on disk; index not yet)."""

    def __init__(self, config: BuildConfig, store: str, fitted):
        super().__init__()
        self.config = config
        self.store = str(store)
        self.fitted = fitted  # singleton PCollection of FittedKeys

    def expand(self, docs):
        return docs | "Encode" >> beam.ParDo(
            EncodeShardsFn(self.config, self.store), beam.pvalue.AsSingleton(self.fitted))
