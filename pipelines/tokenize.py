"""Tokenize documents with the target model's tokenizer.

Prompt/response records go through the chat template as one user turn and one assistant turn,
so the store holds exactly the token sequences the model sees in a chat. Plain files are
tokenized without special tokens and end with EOS: the last real token of a file then has EOS as
its next token, the same token the runtime pads values with at a document's end.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipelines.documents import ChatDocument, DeadLetter, TokenizedDoc
from pipelines.readers import DEAD
from pipelines.stage_clock import stage_clock


def load_tokenizer(model: str):
    """(tokenizer, EOS id) of a model, without loading its weights."""
    from transformers import AutoTokenizer, GenerationConfig

    from dresd.models import document_eos, resolve_model_path

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = None  # read only when the tokenizer names no EOS
    if tokenizer.eos_token_id is None and (path / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(path)
    return tokenizer, document_eos(tokenizer, config, f" of {path}")


def document_tokens(tokenizer, eos_id: int, doc) -> list[int]:
    if isinstance(doc, ChatDocument):
        messages = [{"role": "user", "content": doc.prompt},
                    {"role": "assistant", "content": doc.response}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [eos_id]


def tokenized(tokenizer, eos_id: int, doc) -> TokenizedDoc | None:
    """The document's tokens; None for a record the tokenizer cannot template."""
    if isinstance(doc, ChatDocument) and not tokenizer.chat_template:
        return None
    # Never fewer than two tokens (text + EOS, or a templated chat), so every document
    # yields at least one key.
    tokens = np.asarray(document_tokens(tokenizer, eos_id, doc), np.int32)
    return TokenizedDoc(doc_id=doc.doc_id, source=doc.source, tokens=tokens)


class TokenizeFn(beam.DoFn):
    def __init__(self, model: str):
        self.model = model

    def setup(self):
        self.tokenizer, self.eos_id = load_tokenizer(self.model)

    def process(self, doc):
        with stage_clock("tokenize"):
            out = tokenized(self.tokenizer, self.eos_id, doc)
        if out is None:
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(
                doc.source, "prompt/response record, but the tokenizer has no chat template"))
        else:
            yield out


class Tokenize(beam.PTransform):
    """Documents -> TokenizedDocs (main output) and DeadLetters (``dead``)."""

    def __init__(self, model: str):
        super().__init__()
        self.model = model

    def expand(self, docs):
        return docs | "Tokenize" >> beam.ParDo(TokenizeFn(self.model)).with_outputs(
            DEAD, main="tokenized")
