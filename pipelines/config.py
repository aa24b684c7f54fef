"""Typed configuration of the builder, shared by the Python API and the ``dresd`` CLI."""

from __future__ import annotations

from dataclasses import dataclass

from dresd.config import option
from schemas.ranges import MAX_VALUE_LEN

INDEX_KINDS = ("ivf_flat", "ivf_pq")


@dataclass(frozen=True)
class BuildConfig:
    model: str = option("default", "target model: a local Hugging Face directory or 'default'")
    device: str = option("", "torch device for the encoder ('' picks CUDA when present)")
    dtype: str = option("", "encoder weights dtype ('' = bfloat16 on CUDA, where the forward "
                            "runs under bfloat16 autocast, float32 on CPU)")
    dim: int = option(64, "key dimension after PCA")
    value_len: int = option(20, "N, tokens per value (the runtime slices them from the stream)")
    index_kind: str = option("ivf_pq", "faiss index kind: ivf_pq (compressed codes, the "
                             "default) or ivf_flat (float32 keys in the index, ~10x larger)",
                             choices=INDEX_KINDS)
    nlist: int = option(0, "IVF lists (0 = about 4*sqrt(keys), capped by the training keys)")
    nprobe: int = option(16, "lists probed per query by default at decode time")
    pq_m: int = option(0, "PQ sub-quantizers, one byte each (ivf_pq only; must divide dim; "
                          "0 = dim/4, 16 for d=64)")
    pq_nbits: int = option(8, "bits per PQ code (ivf_pq only)")
    sample_size: int = option(16384, "hidden states sampled (and encoded) to fit the transform")
    train_size: int = option(0, "stored keys sampled to train the index quantizer (0 = about "
                                "39 per list, at least 65536, at most ~4M, never more than the "
                                "store holds; the paper used about 1M)")
    archive: bool = option(True, "keep the float16 keys in the store's Lance dataset "
                                 "archive.lance (about 2*dim+40 bytes/token), from which "
                                 "`dresd reindex` builds a new index without the model; "
                                 "--no-archive drops them after the fill (the runtime never "
                                 "reads them)")
    batch_tokens: int = option(8192, "token budget of one forward batch, padding included")
    max_len: int = option(2048, "longest window of one forward pass; longer documents are split")
    shard_tokens: int = option(1_000_000, "tokens per shard before a new one is started")
    glob: str = option("**/*.txt", "files of a corpus directory, one document per file")
    prompt_field: str = option("prompt", "prompt field of JSONL/Parquet records")
    response_field: str = option("response", "response field of JSONL/Parquet records")
    max_doc_bytes: int = option(8_000_000, "larger documents go to the dead letter")
    seed: int = option(0, "seed of the state sample and of the IVF training")
    progress: bool = option(True, "show progress bars")
    note: str = option("", "free text recorded in the manifest")

    def __post_init__(self):
        if self.index_kind not in INDEX_KINDS:
            raise ValueError(f"index_kind must be one of {INDEX_KINDS}, not {self.index_kind!r}")
        positive = ("dim", "value_len", "nprobe", "sample_size", "batch_tokens", "max_len",
                    "shard_tokens", "max_doc_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 2 <= self.value_len <= MAX_VALUE_LEN:
            raise ValueError(f"value_len must be 2..{MAX_VALUE_LEN}, not {self.value_len}")
        if self.nlist < 0 or self.train_size < 0 or self.pq_m < 0:
            raise ValueError("nlist, train_size and pq_m must be 0 (auto) or positive")
        if self.batch_tokens < self.max_len:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens}) must hold one window of max_len ({self.max_len})"
            )
        if self.index_kind == "ivf_pq":
            if self.pq_m and self.dim % self.pq_m:
                raise ValueError(f"pq_m ({self.pq_m}) must divide dim ({self.dim})")
            if not 1 <= self.pq_nbits <= 16:
                raise ValueError("pq_nbits must be between 1 and 16")


@dataclass(frozen=True)
class GenerateConfig:
    model: str = option("default", "target model: a local Hugging Face directory or 'default'")
    device: str = option("", "torch device ('' picks CUDA when present)")
    dtype: str = option("", "model weights dtype ('' = float32, the dtype the runtime decodes "
                            "in, so the completions are the greedy outputs it reproduces)")
    prompt_field: str = option("prompt", "field of the prompt in the input JSONL/Parquet records")
    response_field: str = option("response", "field the response is written to")
    max_new_tokens: int = option(256, "longest response in tokens")
    batch_size: int = option(8, "prompts generated together")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "sampling temperature (with --sample)")
    top_p: float = option(1.0, "nucleus sampling mass (with --sample)")
    seed: int = option(0, "sampling seed")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive")
        if not 1e-2 <= self.temperature <= 1e4 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be between 0.01 and 10000 and top_p in (0, 1], "
                             f"got {self.temperature} and {self.top_p}")
