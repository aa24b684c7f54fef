"""The elements that flow through the builder's pipelines. All are small and picklable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from schemas.manifest import ArchiveFragment, ShardInfo


@dataclass(frozen=True)
class TextDocument:
    """One plain-text or code file."""

    source: str
    text: str

    @property
    def doc_id(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatDocument:
    """One prompt/response record; prompt and response are encoded together."""

    source: str
    prompt: str
    response: str

    @property
    def doc_id(self) -> str:
        canonical = json.dumps(
            {"prompt": self.prompt, "response": self.response},
            sort_keys=True, ensure_ascii=False, separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


Document = TextDocument | ChatDocument


@dataclass(frozen=True)
class TokenizedDoc:
    doc_id: str
    source: str
    tokens: np.ndarray  # int32 [length]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class DeadLetter:
    """Input the builder could not use, with the reason; written out and reported at the end."""

    source: str
    reason: str
    excerpt: str = ""

    @classmethod
    def of(cls, source: str, reason: str, raw: str | bytes = "") -> DeadLetter:
        if isinstance(raw, bytes):
            raw = raw[:200].decode("utf-8", errors="backslashreplace")
        return cls(source=source, reason=reason, excerpt=raw[:200])


@dataclass(frozen=True)
class WrittenShard:
    """A shard whose tokens and docs are on disk and whose keys are in its archive fragment
    (not committed yet); its inverted lists are not written yet."""

    shard_id: str
    num_docs: int
    num_tokens: int
    num_keys: int
    archive: ArchiveFragment | None = None


@dataclass(frozen=True)
class FilledShard:
    """A shard with its inverted lists written, and the digest of the quantizer that filled
    them. The lists are only valid under that quantizer, so the run records the shard only if
    the quantizer it commits is that one (pipelines.journal.check_filled_with): on a cluster
    the engine may train the quantizer again after losing the worker that held it, and fill
    the remaining shards with the new one."""

    info: ShardInfo
    quantizer_sha256: str
