"""The key archive (archive.lance): what a build writes into it, LanceDB queries over it, its
checksums, and ``dresd reindex`` from it."""

import shutil

import numpy as np
import pytest
from tiny_models import write_corpus_with_own_continuation

from dresd import StoreFormatError, generate, load_store, open_archive
from dresd.cli import main as dresd_main
from dresd.models import load_model
from pipelines.build import build_store
from pipelines.config import BuildConfig
from pipelines.reindex import ReindexSettings, reindex_store
from schemas import read_manifest
from schemas.archive import read_shard_keys
from schemas.lists import unpack_ids
from schemas.shard_io import key_positions, read_docs, read_tokens

PROMPT = "def parse_args(argv):\n    parser = "


def _config(model_dir, **kw):
    return BuildConfig(**{"model": str(model_dir), "dim": 16, "value_len": 12,
                          "sample_size": 2000, "shard_tokens": 12000, "progress": False, **kw})


@pytest.fixture(scope="module")
def built(tiny_llama_dir, code_corpus_dir, tmp_path_factory):
    """A store of several shards over stdlib files and the model's own greedy continuation of
    PROMPT; the model, tokenizer and that continuation."""
    model, tok = load_model(tiny_llama_dir)
    corpus = tmp_path_factory.mktemp("corpus")
    ref = write_corpus_with_own_continuation(model, tok, PROMPT, code_corpus_dir, corpus, 40)
    store = tmp_path_factory.mktemp("store") / "s"
    build_store(corpus, store, _config(tiny_llama_dir))
    return store, model, tok, ref


def _all_keys(store):
    """(shard ids, positions, next tokens, float32 keys) of every key, from the fragments."""
    m = read_manifest(store)
    sids, positions, nexts, keys = [], [], [], []
    for s in m.shards:
        pos, k = read_shard_keys(store, s)
        tokens = read_tokens(store, s.shard_id)
        sids += [s.shard_id] * len(pos)
        positions.append(pos)
        nexts.append(tokens[pos + 1])
        keys.append(k.astype(np.float32))
    return (np.array(sids), np.concatenate(positions), np.concatenate(nexts),
            np.concatenate(keys))


def test_the_archive_holds_every_key_once_with_its_context(built):
    store, *_ = built
    m = read_manifest(store)
    assert len(m.shards) >= 2 and m.archive is not None
    assert m.archive.rows == m.num_keys == open_archive(store).count_rows()
    assert open_archive(store).version == m.archive.version
    for s in m.shards:
        tokens = read_tokens(store, s.shard_id)
        docs = read_docs(store, s.shard_id)
        starts, lengths = docs.column("start").to_numpy(), docs.column("length").to_numpy()
        want = key_positions(starts, lengths, len(tokens))
        pos, keys = read_shard_keys(store, s)
        assert np.array_equal(pos, want) and keys.dtype == np.float16
        assert np.allclose(np.linalg.norm(keys.astype(np.float32), axis=1), 1, atol=2e-3)
        rows = (open_archive(store).search().where(f"shard = '{s.shard_id}'")
                .select(["position", "next_token", "doc_id"]).limit(None).to_arrow()
                .sort_by("position"))
        assert np.array_equal(rows.column("position").to_numpy(), want)
        assert np.array_equal(rows.column("next_token").to_numpy(), tokens[want + 1])
        doc_of = np.searchsorted(starts, want, side="right") - 1
        assert rows.column("doc_id").to_pylist() == [docs.column("doc_id")[i].as_py()
                                                      for i in doc_of]
    b = m.storage_bytes()
    assert b["archive"] == sum(f.bytes for f in m.archive_files()) > 2 * m.dim * m.num_keys


def _assert_same_hits(hits, exact_ids, exact_scores, scores_of):
    """LanceDB's top hits are the exact search's: the same keys, or where two scores tie at
    the cut, keys with the same scores."""
    got = list(zip(hits.column("shard").to_pylist(), hits.column("position").to_pylist()))
    assert len(got) == len(exact_ids)
    if set(got) != set(exact_ids):
        np.testing.assert_allclose(sorted(scores_of(got)), sorted(exact_scores), atol=1e-3)
    np.testing.assert_allclose(1 - hits.column("_distance").to_numpy(),
                               scores_of(got), atol=2e-3)


def test_lancedb_flat_search_returns_the_exact_top_hits(built):
    """The README's recipe: a vector search over the keys, alone and with a next_token
    filter, scanning every key (no ANN index), equals an exact search over the same keys."""
    store, *_ = built
    sids, positions, nexts, keys = _all_keys(store)
    where = {(s, int(p)): i for i, (s, p) in enumerate(zip(sids, positions))}

    def scores_of(pairs):
        return np.array([keys[where[p]] @ q for p in pairs])

    table = open_archive(store)
    rng = np.random.default_rng(0)
    for row in rng.choice(len(keys), 4, replace=False):
        q = keys[row] + rng.normal(0, 0.05, keys.shape[1]).astype(np.float32)
        q /= np.linalg.norm(q)
        scores = keys @ q
        top = np.argsort(-scores, kind="stable")[:10]
        hits = table.search(q).metric("dot").limit(10).to_arrow()
        _assert_same_hits(hits, [(sids[i], int(positions[i])) for i in top], scores[top],
                          scores_of)
        y = int(nexts[row])
        only = np.flatnonzero(nexts == y)
        top_y = only[np.argsort(-scores[only], kind="stable")[:10]]
        hits = (table.search(q).metric("dot").where(f"next_token = {y}", prefilter=True)
                .limit(10).to_arrow())
        assert set(hits.column("next_token").to_pylist()) == {y}
        _assert_same_hits(hits, [(sids[i], int(positions[i])) for i in top_y], scores[top_y],
                          scores_of)


def test_the_documents_a_draft_came_from(built):
    """A search of the serving index names (shard, position); the archive says which document
    that key is in (the README's provenance recipe)."""
    store_path, model, tok, _ = built
    store = load_store(store_path)
    sids, positions, nexts, keys = _all_keys(store_path)
    q = keys[len(keys) // 2]
    shard_no, ids, _ = store.search.search(q, int(nexts[len(keys) // 2]), 5)
    _, pos = unpack_ids(ids)
    assert len(pos) > 0
    table = open_archive(store_path)
    for sh, p in zip(shard_no.tolist(), pos.tolist()):
        sid = store.manifest.shards[sh].shard_id
        row = table.search().where(f"shard = '{sid}' AND position = {p}").limit(1).to_arrow()
        docs = read_docs(store_path, sid)
        starts = docs.column("start").to_numpy()
        doc = docs.column("doc_id")[int(np.searchsorted(starts, p, side="right") - 1)].as_py()
        assert row.column("doc_id").to_pylist() == [doc]


def test_verify_detects_a_flipped_byte_in_the_archive(built, tmp_path, capsys):
    store, *_ = built
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    m = read_manifest(copy)
    assert dresd_main(["verify", str(copy), "--no-progress"]) == 0
    for ref in (m.shards[0].archive.file, m.archive.manifest):
        path = copy / ref.path
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        capsys.readouterr()
        assert dresd_main(["verify", str(copy), "--no-progress"]) == 1
        assert f"CORRUPT {ref.path}" in capsys.readouterr().err
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    assert dresd_main(["verify", str(copy), "--no-progress"]) == 0
    load_store(copy)  # decoding never reads the archive


def _decode(path, model, tok, tmp_path, monkeypatch):
    from tiny_models import save_flat_calibration

    store = load_store(path, model, tok)
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    save_flat_calibration(model, store.manifest.model.fingerprint)
    return generate(model, tok, store, PROMPT, max_new_tokens=40, num_drafts=4, draft_len=8)


def test_reindex_with_the_build_settings_reproduces_its_index(built, tmp_path, monkeypatch):
    """The build drew its training sample from the same fragments with the same seed: a
    re-index with the same settings trains the same quantizer and fills the same lists, so
    every search finds the same keys and decoding gives the same output."""
    store, model, tok, ref = built
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    before = read_manifest(copy)
    after = reindex_store(copy, ReindexSettings())
    assert after.generation == before.generation + 1
    assert after.index == before.index and after.archive == before.archive
    for old, new in zip(before.shards, after.shards):
        assert new.index.path != old.index.path and new.index.sha256 == old.index.sha256
        assert (new.tokens, new.docs, new.counts) == (old.tokens, old.docs, old.counts)
    a = _decode(store, model, tok, tmp_path, monkeypatch)
    b = _decode(copy, model, tok, tmp_path, monkeypatch)
    assert a.tokens == b.tokens == ref
    # the same hits for every query (the drafts a decode gets differ only by its timing-driven
    # budget, which this test does not fix)
    old, new = load_store(store), load_store(copy)
    _, _, nexts, keys = _all_keys(store)
    for row in range(0, len(keys), max(1, len(keys) // 50)):
        a_hits = old.search.search(keys[row], int(nexts[row]), 8)
        b_hits = new.search.search(keys[row], int(nexts[row]), 8)
        for x, y in zip(a_hits, b_hits):
            assert np.array_equal(x, y)


def test_reindex_to_other_settings_stays_lossless(built, tmp_path, monkeypatch, capsys):
    store, model, tok, ref = built
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    assert dresd_main(["reindex", str(copy), "--index-kind", "ivf_flat", "--nlist", "24",
                       "--nprobe", "8"]) == 0
    assert "ivf_flat nlist=24" in capsys.readouterr().out
    m = read_manifest(copy)
    assert (m.index.kind, m.index.nlist, m.index.nprobe) == ("ivf_flat", 24, 8)
    assert m.note == "reindex ivf_flat nlist=24 nprobe=8"
    assert _decode(copy, model, tok, tmp_path, monkeypatch).tokens == ref
    assert dresd_main(["info", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"archive.lance version {m.archive.version}, {m.num_keys} keys" in out
    assert dresd_main(["reindex", str(copy), "--index-kind", "ivf_pq", "--pq-m", "5"]) == 2
    assert "pq_m (5) must divide dim (16)" in capsys.readouterr().err
    assert read_manifest(copy).generation == m.generation


def test_a_store_without_archive_cannot_be_reindexed(tiny_llama_dir, code_corpus_dir, tmp_path,
                                                     capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in sorted(code_corpus_dir.iterdir())[:2]:
        (corpus / (p.name + ".txt")).write_text(p.read_text())
    store = tmp_path / "s"
    m = build_store(corpus, store, _config(tiny_llama_dir, archive=False))
    assert m.archive is None and all(s.archive is None for s in m.shards)
    assert not any((store / "archive.lance" / "data").iterdir())
    assert m.storage_bytes()["archive"] == 0
    with pytest.raises(StoreFormatError, match="no key archive"):
        reindex_store(store)
    with pytest.raises(StoreFormatError, match="keeps no key archive"):
        open_archive(store)
    assert dresd_main(["reindex", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dresd reindex: error:") and "--no-archive" in err[0]
