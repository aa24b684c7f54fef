"""load_store on stores built by the builder; dense drafting; bad stores give clear errors."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
from tiny_models import write_corpus_with_own_continuation

from dresd.decode import generate
from dresd.models import load_model
from dresd.store import StoreMismatchError, load_store
from schemas import StoreFormatError, read_manifest, write_manifest
from schemas.archive import read_shard_keys
from schemas.commit import CommitConflictError
from schemas.lists import ListsFile, pack_ids, unpack_ids, write_lists
from schemas.manifest import make_file_ref
from schemas.shard_io import key_positions

PROMPT = "def parse_args(argv):\n    parser = "


@pytest.fixture(scope="module")
def built(tiny_llama_dir, code_corpus_dir, tmp_path_factory):
    """A two-shard store of the tiny llama over stdlib files plus the model's own greedy
    continuation of PROMPT (an in-domain document, so dense drafts get accepted)."""
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    model, tok = load_model(tiny_llama_dir)
    corpus = tmp_path_factory.mktemp("corpus")
    ref = write_corpus_with_own_continuation(model, tok, PROMPT, code_corpus_dir, corpus, 60)
    store = tmp_path_factory.mktemp("store") / "s"
    build_store(corpus, store, BuildConfig(model=str(tiny_llama_dir), dim=16, value_len=12,
                                           sample_size=2000, shard_tokens=12000, progress=False))
    return store, model, tok, ref


def _positions(shard):
    return key_positions(shard.doc_starts, shard.doc_lengths, len(shard.tokens))


def test_load_store_values_and_stats(built):
    path, *_ = built
    store = load_store(path)
    m = store.manifest
    assert store.num_keys == m.num_keys and len(store.shards) == len(m.shards) >= 2
    assert store.stats.num_tokens == m.num_tokens and store.stats.resident_bytes > 0
    b = store.stats.bytes_per_token
    assert set(b) == {"values", "index", "docs", "shared", "serving", "archive", "total"}
    # codes of d/4 bytes + an 8-byte id per key, 4 bytes per token; the archive 2 bytes x d
    # per key plus its columns (shard, position, next token, document), well compressed
    assert b["index"] == pytest.approx(4 + 8, rel=0.1) and b["values"] == pytest.approx(4, 0.01)
    assert 2 * 16 < b["archive"] < 2 * 16 + 40
    assert b["total"] == pytest.approx(b["serving"] + b["archive"])
    assert m.archive is not None and m.archive.rows == m.num_keys  # kept by default
    # Every key's value starts with its next token and follows the token stream to the
    # document's end, then EOS.
    rng = np.random.default_rng(0)
    for s, shard in enumerate(store.shards):
        pos = _positions(shard)
        assert len(pos) == shard.num_keys
        for p in rng.choice(pos, 50, replace=False):
            v = store.value(s, p)
            assert v[0] == shard.tokens[p + 1]
            d = np.searchsorted(shard.doc_starts, p, side="right") - 1
            n = min(m.value_len, shard.doc_ends[d] - p - 1)
            assert v[:n].tolist() == shard.tokens[p + 1 : p + 1 + n].tolist()
            assert (v[n:] == m.model.eos_token_id).all()
    with pytest.raises(StoreFormatError, match="outside its token stream"):
        store.value(0, len(store.shards[0].tokens))


def test_load_never_reads_the_keys(built, monkeypatch, tmp_path):
    """The runtime opens no float keys: nothing under archive.lance is opened and the archive
    readers are forbidden, the archive may be gone, and load's resident memory does not hold
    them."""
    import builtins
    import io

    import schemas.archive

    path, *_ = built
    assert (path / "archive.lance" / "data").is_dir()  # there to be read, if anything would

    def forbidden(*a, **k):
        raise AssertionError("load_store read the key archive")

    for name in ("lance", "fragment_rows", "read_shard_keys", "keys_of"):
        monkeypatch.setattr(schemas.archive, name, forbidden)
    opened = []

    def tracking(real):
        def opener(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                opened.append(os.fsdecode(file))
            return real(file, *a, **k)

        return opener

    monkeypatch.setattr(np, "load", tracking(np.load))
    monkeypatch.setattr(builtins, "open", tracking(builtins.open))
    monkeypatch.setattr(io, "open", tracking(io.open))  # pathlib's
    monkeypatch.setattr(os, "open", tracking(os.open))
    store = load_store(path)
    assert store.search.num_keys == store.num_keys
    monkeypatch.undo()
    seen = {f.rsplit("/", 1)[1] for f in opened}
    assert {"CURRENT", f"gen-{store.manifest.generation:06d}.json", "docs.arrow", "counts.npy",
            "ivf.lists"} <= seen, seen  # the tracking sees load_store's own opens ...
    assert not [f for f in opened if "archive.lance" in f], "load_store opened the archive"
    # nothing held in memory is as large as the keys (keys x d float16)
    held = [v for sh in store.shards for v in vars(sh).values() if isinstance(v, np.ndarray)]
    assert not any(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in held)
    assert store.stats.resident_bytes < store.num_keys * 16 * 2
    # ... and without the archive the store loads, verified in full, and searches the same
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    gone = tmp_path / "s"
    shutil.copytree(path, gone)
    shutil.rmtree(gone / "archive.lance")
    again = load_store(gone, verify="full")
    assert again.num_keys == store.num_keys and again.stats.bytes_per_token == (
        store.stats.bytes_per_token)
    token = int(np.argmax(np.sum([sh.counts for sh in store.shards], axis=0)))
    q = np.ones(store.manifest.dim, np.float32) / np.sqrt(store.manifest.dim)
    a, b = store.search.search(q, token, 10), again.search.search(q, token, 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _exact(path, store, q, token, k):
    """Brute force over the archived float16 keys followed by ``token``."""
    best = []
    for s, shard in enumerate(store.shards):
        pos = _positions(shard)
        pos = pos[np.asarray(shard.tokens)[pos + 1] == token]
        positions, keys = read_shard_keys(path, store.manifest.shards[s])
        assert np.array_equal(positions, _positions(shard))  # row i: the key at position i
        sc = keys[np.searchsorted(positions, pos)].astype(np.float32) @ q
        best += [(float(sc[j]), s, int(pos[j])) for j in np.argsort(-sc)[:k]]
    return {(s, p) for _, s, p in sorted(best, reverse=True)[:k]}


def test_search_returns_keys_of_the_decided_token(built):
    path, *_ = built
    store = load_store(path, verify=False)
    s = store.search
    rng = np.random.default_rng(1)
    sizes = np.sum([sh.counts for sh in store.shards], axis=0)
    tokens = [int(t) for t in np.argsort(-sizes)[:3]] + [int(np.flatnonzero(sizes == 3)[0])]
    recalls = []
    for token in tokens:
        assert s.group_size(token) == sizes[token]
        # a query near a key of the token, as in decoding
        sh = int(np.argmax([c[token] for c in s.counts]))
        pos = _positions(store.shards[sh])
        pos = pos[np.asarray(store.shards[sh].tokens)[pos + 1] == token]
        positions, keys = read_shard_keys(path, store.manifest.shards[sh])
        q = keys[np.searchsorted(positions, pos[0])].astype(np.float32)
        q += 0.05 * rng.standard_normal(len(q)).astype(np.float32)
        q /= np.linalg.norm(q)
        shards, ids, scores = s.search(q, token, 10)
        assert len(ids) == min(10, sizes[token])  # the tiny index: 4 x nprobe covers it all
        nxt, positions = unpack_ids(ids)
        assert (nxt == token).all() and np.all(np.diff(scores) <= 1e-6)
        assert all(store.hit_value(a, b, token)[0] == token for a, b in zip(shards, ids))
        got = set(zip(shards.tolist(), positions.tolist()))
        exact = _exact(path, store, q, token, 10)
        recalls.append(len(got & exact) / len(exact))
        # one probed list: fewer maybe, but every one of them followed by the token
        _, ids1, _ = s.search(q, token, 10, nprobe=1)
        assert len(ids1) <= 10 and (unpack_ids(ids1)[0] == token).all()
        conts = store.continuations(q, token, 10)
        assert len(conts) == len(ids) and all(len(c) == store.value_len - 1 for c, _ in conts)
    assert np.mean(recalls) >= 0.5, recalls
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


def test_corrupt_shard_is_named(built, tmp_path, capsys, monkeypatch):
    from dresd.cli import main

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    path = _copy(built[0], tmp_path)
    m = read_manifest(path)
    shard = m.shards[1]
    # every file verify checksums: 4 serving files and an archive fragment per shard, the
    # transform, the quantizer and the archive's version manifest
    files = len(m.files())
    assert files == 5 * len(m.shards) + 3
    # a small file read whole (the document table) is checksummed at every load
    f = path / shard.docs.path
    original = f.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match=f"{shard.shard_id}/docs.arrow is corrupt"):
        load_store(path)
    f.write_bytes(original)
    # a large mapped file (the token stream): a default load does not read it whole ...
    f = path / shard.tokens.path
    original = f.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert load_store(path).stats.unverified_bytes > 0
    # ... a full load and `dresd verify` do
    with pytest.raises(StoreFormatError, match=f"{shard.shard_id}/tokens.arrow is corrupt"):
        load_store(path, verify="full")
    assert main(["verify", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {shard.tokens.path}" in err and err.count("CORRUPT") == 1
    f.write_bytes(original)
    assert main(["verify", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # the first run recorded every other file: only the repaired one is checksummed again
    assert f"{files} files" in out and " 1 checksummed" in out
    assert f"{files - 1} already verified" in out and "0 corrupt" in out
    # recorded: the next run checksums nothing, and a default load counts every file verified
    assert main(["verify", str(path), "--no-progress"]) == 0
    assert " 0 checksummed" in capsys.readouterr().out
    assert load_store(path).stats.unverified_bytes == 0
    # a rewritten file loses its record (its mtime changed), even with the same bytes
    f.write_bytes(original)
    assert load_store(path).stats.unverified_bytes == shard.tokens.bytes
    (path / shard.index.path).unlink()
    with pytest.raises(StoreFormatError, match="ivf.lists does not exist"):
        load_store(path)


def _rewrite_lists(path, shard_no, change):
    """A new generation whose shard ``shard_no`` has its lists' ids passed through ``change``
    (the lists file rewritten in place: a manifest names only its shard's own files)."""
    m = read_manifest(path)
    info = m.shards[shard_no]
    src = ListsFile(path / info.index.path)
    rel = info.index.path
    h = src.header
    write_lists(path / (rel + ".new"), h.nlist, h.code_size, h.sizes,
                ((src.list(i)[0], change(src.list(i)[1].copy())) for i in range(h.nlist)))
    del src
    os.replace(path / (rel + ".new"), path / rel)
    shards = list(m.shards)
    shards[shard_no] = dataclasses.replace(info, index=make_file_ref(path, rel))
    _next_generation(path, shards=tuple(shards))


def test_out_of_range_ids_are_clear_errors(built, tmp_path):
    path = _copy(built[0], tmp_path)
    n = len(load_store(path, verify=False).shards[0].tokens)

    def beyond(ids):  # every position moved past the end of the token stream
        t, p = unpack_ids(ids)
        return pack_ids(t, p + n)

    _rewrite_lists(path, 0, beyond)
    store = load_store(path)  # ids are not read at load: they are checked on use
    token = int(np.argmax(store.shards[0].counts))
    q = np.ones(store.manifest.dim, np.float32) / np.sqrt(store.manifest.dim)
    shards, ids, _ = store.search.search(q, token, 50, nprobe=store.search.nlist)
    assert (shards == 0).any()
    with pytest.raises(StoreFormatError, match=r"shard .* key position \d+ is outside its "
                       r"token stream"):
        store.hit_value(0, ids[shards == 0][0], token)

    path2 = _copy(built[0], tmp_path / "b")

    def shifted(ids):  # in range, but not where the token stream says the token is
        t, p = unpack_ids(ids)
        return pack_ids(t, np.maximum(p - 1, 0))

    _rewrite_lists(path2, 0, shifted)
    store = load_store(path2)
    shards, ids, _ = store.search.search(q, token, 50, nprobe=store.search.nlist)
    with pytest.raises(StoreFormatError, match="does not match the token stream"):
        for i in ids[shards == 0]:  # position 0 stays put; any other moved one is wrong
            store.hit_value(0, i, token)


def test_old_format_store_gets_the_documented_message(built, tmp_path):
    import json

    path = _copy(built[0], tmp_path)
    m = read_manifest(path)
    f = path / "manifests" / f"gen-{m.generation:06d}.json"
    d = json.loads(f.read_text())
    d["format_version"] = 1
    f.write_text(json.dumps(d))
    with pytest.raises(StoreFormatError, match=r"store format 1 is no longer supported.*"
                       r"`dresd build NEW_STORE CORPUS\.\.\.`"):
        load_store(path)


def test_empty_store_and_missing_store(built, tmp_path):
    path = _copy(built[0], tmp_path)
    with pytest.raises(StoreFormatError, match="archive/rows"):  # its archive must go too
        _next_generation(path, shards=())
    _next_generation(path, shards=(), archive=None)
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
    with pytest.raises(StoreFormatError, match=r"counts.npy: int32 \(\d+,\), not int32 \[50\]"):
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
