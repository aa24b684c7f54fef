"""Tiny random models of three families with a real (small, trained here) BPE tokenizer.

Nothing is downloaded: the tokenizer is trained in-process on standard-library sources and the
models are randomly initialised from a config, then saved as ordinary Hugging Face directories so
every code path that loads a model from disk is exercised.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def stdlib_files(n: int = 40) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 40_000)
    return files[:n]


def split_corpus(root: Path, code_dir: Path, first_n: int, later_n: int) -> tuple[Path, Path]:
    """``root``/first with ``first_n`` code files of ``code_dir`` plus a non-UTF-8 file (a dead
    letter), and ``root``/later with the next ``later_n`` (for an update)."""
    first, later = root / "first", root / "later"
    first.mkdir()
    later.mkdir()
    files = sorted(code_dir.glob("*.py"))
    for f in files[:first_n]:
        (first / f.name).write_bytes(f.read_bytes())
    for f in files[first_n:first_n + later_n]:
        (later / f.name).write_bytes(f.read_bytes())
    (first / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return first, later


@functools.cache
def tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, **common)
    raise ValueError(family)


def make_tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), dtype=torch.float32)
    # Random weights give near-uniform logits; a larger output scale makes greedy choices
    # decisive, as in a trained model, so exact-match tests are not decided by float noise.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def save_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    model, tok = make_tiny_model(family, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def greedy_reference(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The new tokens of ``model.generate(do_sample=False)``: what lossless decoding must equal."""
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def save_flat_calibration(model, fingerprint: str) -> None:
    """Save a verify-cost curve as flat as a GPU's for ``model`` (under DRESD_CACHE) and drop
    any calibration held in memory. Tests that check drafts get accepted under the default
    (calibrated) budget use it: a tiny model's measured costs are noise-level timings, and a
    noisy curve can rightly decide that drafting does not pay on a loaded machine."""
    from dresd import budget
    from dresd.calibrate import Calibration, calibration_path, device_name

    sizes = (1, 2, 4, 8, 16, 32, 64)
    Calibration(fingerprint, device_name(model.device), 32, sizes, (1e-3,) * len(sizes)).save(
        calibration_path(fingerprint, model.device))
    budget._CALIBRATIONS.pop(model, None)


def write_corpus_with_own_continuation(model, tok, prompt: str, code_corpus_dir: Path,
                                       corpus: Path, max_new_tokens: int) -> list[int]:
    """Write 5 stdlib files and the model's own greedy continuation of ``prompt`` (an
    in-domain document, so dense drafts get accepted) into ``corpus``; the continuation's
    tokens, which lossless decoding must reproduce."""
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    for p in sorted(code_corpus_dir.iterdir())[:5]:
        (corpus / (p.name + ".txt")).write_text(p.read_text())
    (corpus / "own.txt").write_text(tok.decode(out[0], skip_special_tokens=True))
    return out[0, len(ids):].tolist()
