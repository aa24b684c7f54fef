"""Sample hidden states for fitting: a random subset of documents, encoded, then of positions.

Documents are chosen by the smallest content hashes (a uniform, reproducible choice that
merges across workers) from the first read of the corpus, before tokenization, until their
text holds ``SAMPLE_CHARS_PER_TOKEN`` x ``OVERSAMPLE`` x sample_size characters (text runs
2.5-5 characters per token, so that is enough tokens with room to spare). Only they are
tokenized here; they are encoded from their start, so every state has its real left context,
the last one only up to ``OVERSAMPLE`` x sample_size tokens in all (a long file would otherwise
add up to a whole document of forward work), and sample_size positions are drawn from them.
"""

from __future__ import annotations

import bisect

import apache_beam as beam
import numpy as np

from pipelines.config import BuildConfig
from pipelines.documents import ChatDocument
from pipelines.stage_clock import stage_clock
from pipelines.tokenize import load_tokenizer, tokenized

OVERSAMPLE = 2
SAMPLE_CHARS_PER_TOKEN = 8


def text_size(doc) -> int:
    """Characters of a document's text (a file, or a record's prompt and response)."""
    if isinstance(doc, ChatDocument):
        return len(doc.prompt) + len(doc.response)
    return len(doc.text)


class SmallestHashDocs(beam.CombineFn):
    """The documents with the smallest ids whose sizes (``size_of``) reach ``target``."""

    def __init__(self, target: int, size_of=text_size):
        self.target = target
        self.size_of = size_of

    def create_accumulator(self):
        return []  # (doc_id, doc), sorted by doc_id

    def _trim(self, acc):
        total = sum(self.size_of(d) for _, d in acc)
        while acc and total - self.size_of(acc[-1][1]) >= self.target:
            total -= self.size_of(acc.pop()[1])
        return acc

    def add_input(self, acc, doc):
        with stage_clock("sample_pick"):
            bisect.insort(acc, (doc.doc_id, doc), key=lambda x: x[0])
            return self._trim(acc)

    def merge_accumulators(self, accs):
        merged = sorted((x for acc in accs for x in acc), key=lambda x: x[0])
        return self._trim(merged)

    def extract_output(self, acc):
        return [d for _, d in acc]


class EncodeSampleFn(beam.DoFn):
    """A list of documents (text) -> float32 hidden states [min(tokens, sample_size), H]."""

    def __init__(self, config: BuildConfig):
        self.config = config

    def setup(self):
        from pipelines.encoder import EncoderSpec, acquire_encoder, claim_load_ms

        # The process's one encoder, shared with the encoding step (pipelines.encoder).
        self.model = acquire_encoder(EncoderSpec.of(self.config))
        self.load_ms = claim_load_ms(self.model)  # reported from the first bundle
        self.tokenizer, self.eos_id = load_tokenizer(self.config.model)

    def process(self, docs: list):
        import torch

        from pipelines.forward import encode_stream

        if self.load_ms is not None:
            from apache_beam.metrics import Metrics

            from pipelines.dedupe import NAMESPACE
            from pipelines.encode import ENCODER_SETUP_MS

            Metrics.distribution(NAMESPACE, ENCODER_SETUP_MS).update(self.load_ms)
            self.load_ms = None
        with stage_clock("tokenize"):
            docs = [t for d in docs if (t := tokenized(self.tokenizer, self.eos_id, d))]
        if not docs:
            return
        streams, budget = [], OVERSAMPLE * self.config.sample_size
        for d in docs:  # smallest hashes first; the last one is cut at the budget
            streams.append(d.tokens[:budget])
            budget -= len(streams[-1])
            if budget <= 0:
                break
        with stage_clock("sample_forward"):
            states = encode_stream(
                self.model, streams, self.model.hidden_size,
                lambda h: h.to(torch.float32), np.float32, self.config.batch_tokens,
                self.config.max_len, self.config.progress, desc="sample states",
            )
        rng = np.random.default_rng(self.config.seed)
        if len(states) > self.config.sample_size:
            states = states[np.sort(rng.choice(len(states), self.config.sample_size, replace=False))]
        yield states


class SampleStates(beam.PTransform):
    """Documents (text, from the first read) -> one float32 array of sampled hidden states."""

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def expand(self, docs):
        return (
            docs
            | "PickDocs" >> beam.CombineGlobally(SmallestHashDocs(
                SAMPLE_CHARS_PER_TOKEN * OVERSAMPLE * self.config.sample_size))
            | "Encode" >> beam.ParDo(EncodeSampleFn(self.config))
        )
