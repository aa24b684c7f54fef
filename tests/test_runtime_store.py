"""load_store on stores built by the builder; dense drafting; bad stores give clear errors."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from dresd.decode import generate
from dresd.models import load_model
from dresd.store import StoreMismatchError, load_store
from schemas import StoreFormatError, read_manifest, write_manifest
from schemas.commit import CommitConflictError
from schemas.shard_io import read_keys

PROMPT = "def parse_args(argv):\n    parser = "


@pytest.fixture(scope="module")
def built(tiny_llama_dir, code_corpus_dir, tmp_path_factory):
    """A two-shard store of the tiny llama over stdlib files plus the model's own greedy
    continuation of PROMPT (an in-domain document, so dense drafts get accepted)."""
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    model, tok = load_model(tiny_llama_dir)
    ids = tok(PROMPT)["input_ids"]
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=60,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    corpus = tmp_path_factory.mktemp("corpus")
    for p in sorted(code_corpus_dir.iterdir())[:5]:
        (corpus / (p.name + ".txt")).write_text(p.read_text())
    (corpus / "own.txt").write_text(tok.decode(out[0], skip_special_tokens=True))
    store = tmp_path_factory.mktemp("store") / "s"
    build_store(corpus, store, BuildConfig(model=str(tiny_llama_dir), dim=16, value_len=12,
                                           sample_size=2000, shard_tokens=12000, progress=False))
    return store, model, tok, out[0, len(ids):].tolist()


def test_load_store_values_and_stats(built):
    path, *_ = built
    store = load_store(path)
    m = store.manifest
    assert store.num_keys == m.num_keys and len(store.shards) == len(m.shards) >= 2
    assert store.stats.num_tokens == m.num_tokens and store.stats.resident_bytes > 0
    assert set(store.stats.bytes_per_token) == {"keys", "values", "index"}
    # Every key's value starts with its next token and follows the token stream to the
    # document's end, then EOS.
    rng = np.random.default_rng(0)
    for s, shard in enumerate(store.shards):
        _, pos, nxt = read_keys(path, shard.shard_id)
        for row in rng.choice(len(pos), 50, replace=False):
            v = store.value(store.key_offsets[s] + row)
            assert v[0] == nxt[row]
            d = np.searchsorted(shard.doc_starts, pos[row], side="right") - 1
            n = min(m.value_len, shard.doc_ends[d] - pos[row] - 1)
            assert v[:n].tolist() == shard.tokens[pos[row] + 1 : pos[row] + 1 + n].tolist()
            assert (v[n:] == m.model.eos_token_id).all()
    with pytest.raises(IndexError):
        store.value(store.num_keys)


def test_search_returns_k_keys_of_the_decided_token(built):
    path, *_ = built
    store = load_store(path, verify=False)
    ivf = load_store(path, verify=False, exact_threshold=0)  # every group through the IVF
    s = store.search
    rng = np.random.default_rng(1)
    sizes = np.diff(s.offsets)
    tokens = [int(t) for t in np.argsort(-sizes)[:3]] + [int(np.flatnonzero(sizes == 3)[0])]
    for token in tokens:
        q = rng.standard_normal(store.manifest.dim).astype(np.float32)
        q /= np.linalg.norm(q)
        lo, hi = s.group(token)
        brute = np.argsort(-(s.vectors[lo:hi] @ q), kind="stable")[:10] + lo
        keys, scores = s.search(q, token, 10)
        assert len(keys) == min(10, hi - lo)
        assert all(store.value(g)[0] == token for g in keys)
        assert keys.tolist() == s.order[brute].tolist()
        assert np.all(np.diff(scores) <= 0)
        # The IVF path filters inside the search too: k keys even probing one list.
        keys1, _ = ivf.search.search(q, token, 10, nprobe=1)
        assert len(keys1) == min(10, hi - lo)
        assert all(store.value(g)[0] == token for g in keys1)
        keys_all, _ = ivf.search.search(q, token, 10, nprobe=ivf.search.nlist)
        assert keys_all.tolist() == keys.tolist()
    assert s.search(np.zeros(store.manifest.dim, np.float32), 10**7, 5)[0].size == 0


def test_dense_drafting_is_lossless_and_accepts(built, tmp_path, monkeypatch):
    from tiny_models import save_flat_calibration

    path, model, tok, ref = built
    store = load_store(path, model, tok)
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    save_flat_calibration(model, store.manifest.model.fingerprint)
    res = generate(model, tok, store, PROMPT, max_new_tokens=60, num_drafts=4, draft_len=8)
    assert res.tokens == ref
    # The random model's output does not survive decode + re-encode token for token, so only
    # part of it is in the store; drafts from it must still be accepted.
    assert res.stats.accepted_tokens > 0 and res.stats.accepted_length > 1
    assert res.stats.retrieval_s > 0


def test_store_of_another_model_is_refused(built, tmp_path):
    path, *_ = built
    from tiny_models import save_tiny_model

    other, tok = load_model(save_tiny_model("llama", tmp_path / "other-llama", seed=1))
    with pytest.raises(StoreMismatchError, match=r"built for model .+ \(llama, \w+\), not for .*other-llama"):
        load_store(path, other, tok)
    store = load_store(path, verify=False)
    with pytest.raises(StoreMismatchError, match="other-llama"):
        generate(other, tok, store, PROMPT, max_new_tokens=3)


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _next_generation(path, **changes):
    m = read_manifest(path)
    write_manifest(path, dataclasses.replace(m, generation=m.generation + 1,
                                             parent_generation=m.generation, **changes))


def test_a_published_generation_is_never_overwritten(built, tmp_path):
    path = _copy(built[0], tmp_path)
    m = read_manifest(path)
    before = (path / "manifests" / f"gen-{m.generation:06d}.json").read_bytes()
    with pytest.raises(CommitConflictError, match=f"generation {m.generation} already exists"
                       ".*rerun the command"):
        write_manifest(path, dataclasses.replace(m, note="a racing writer"))
    assert (path / "manifests" / f"gen-{m.generation:06d}.json").read_bytes() == before
    assert read_manifest(path).note == m.note
    assert not [f for f in (path / "manifests").iterdir() if f.name.endswith(".tmp")]


def test_corrupt_shard_is_named(built, tmp_path):
    path = _copy(built[0], tmp_path)
    shard = read_manifest(path).shards[1]
    f = path / shard.tokens.path
    original = f.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match=f"{shard.shard_id}/tokens.arrow is corrupt"):
        load_store(path)
    f.write_bytes(original)
    load_store(path)  # intact again
    (path / shard.index.path).unlink()
    with pytest.raises(StoreFormatError, match="ivf.faiss does not exist"):
        load_store(path)


def test_empty_store_and_missing_store(built, tmp_path):
    path = _copy(built[0], tmp_path)
    _next_generation(path, shards=())
    with pytest.raises(StoreFormatError, match="holds no keys"):
        load_store(path)
    with pytest.raises(FileNotFoundError, match="no store"):
        load_store(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreFormatError, match="not a dresd store"):
        load_store(tmp_path / "plain")


def test_token_ids_outside_the_vocabulary(built, tmp_path):
    path = _copy(built[0], tmp_path)
    m = read_manifest(path)
    _next_generation(path, model=dataclasses.replace(m.model, vocab_size=50))
    with pytest.raises(StoreFormatError, match="outside the model's vocabulary of 50"):
        load_store(path)


def test_cli_generate_prints_text_stats_and_comparison(built, tiny_llama_dir, capsys):
    from dresd.cli import main

    path, model, tok, ref = built
    rc = main(["generate", "--store", str(path), "--model", str(tiny_llama_dir), "--prompt",
               PROMPT, "--max-new-tokens", "20", "--num-drafts", "4", "--compare"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(tok.decode(ref[:20], skip_special_tokens=True))
    assert "AL " in out and "TPS " in out and "retrieval" in out
    assert "plain greedy: identical" in out


def test_cli_reports_a_store_of_another_model(built, tmp_path, capsys):
    from tiny_models import save_tiny_model

    from dresd.cli import main

    other = save_tiny_model("qwen2", tmp_path / "qwen", seed=3)
    rc = main(["generate", "--store", str(built[0]), "--model", str(other), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "built for model" in err and "qwen" in err
