"""End to end: build, update and compact a store with a tiny model, from the API and the CLI."""

import json
import math
import shutil

import faiss
import numpy as np
import pytest
from tiny_models import split_corpus

from dresd.cli import main as dresd_main
from dresd.models import load_model, model_fingerprint
from pipelines import encoder
from pipelines.build import build_store, compact_store, update_store
from pipelines.config import BuildConfig
from pipelines.dead_letter import read_dead_letters
from pipelines.encode import (
    ENCODE_CPU_MS,
    ENCODE_DONE_MS,
    ENCODE_FIRST_MS,
    ENCODE_FORWARD_MS,
    ENCODED_TOKENS,
    ENCODER_SETUP_MS,
)
from pipelines.encoder import EncoderSpec
from pipelines.tokenize import load_tokenizer
from schemas import StoreFormatError, list_generations, read_manifest
from schemas.archive import read_shard_keys
from schemas.lists import ListsFile, unpack_ids
from schemas.manifest import generation_path, make_file_ref
from schemas.shard_io import key_positions, read_counts, read_docs, read_tokens


def _config(model_dir, **kw):
    return BuildConfig(**{"model": str(model_dir), "dim": 16, "sample_size": 1500,
                          "glob": "*.py", "shard_tokens": 20_000, "progress": False, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, code_corpus_dir):
    """6 code files, one non-UTF-8 file and one empty file; 3 more files kept for the update."""
    first, later = split_corpus(tmp_path_factory.mktemp("corpus"), code_corpus_dir, 6, 3)
    (first / "empty.py").write_text("")
    return first, later


@pytest.fixture(scope="module")
def built_with_stats(tmp_path_factory, corpus, tiny_llama_dir):
    """The store, its manifest, and the build's stats, with ``"loads"``: how many times the
    build loaded the encoder in this process (0 when an earlier build left it loaded)."""
    store = tmp_path_factory.mktemp("store") / "s"
    config = _config(tiny_llama_dir)
    tag = EncoderSpec.of(config).tag
    stats = {}
    before = encoder.LOADS[tag]
    manifest = build_store(corpus[0], store, config, stats=stats)
    stats["loads"] = encoder.LOADS[tag] - before
    return store, manifest, stats


@pytest.fixture(scope="module")
def built(built_with_stats):
    return built_with_stats[:2]


def _files_state(store, manifest):
    """Digest of every file a manifest names, and the manifest's own bytes."""
    refs = list(manifest.files())
    return ({r.path: make_file_ref(store, r.path) == r for r in refs},
            generation_path(store, manifest.generation).read_bytes())


def test_build_writes_a_complete_verifiable_store(built, corpus, tiny_llama_dir):
    store, manifest = built
    model, tok = load_model(tiny_llama_dir)
    assert manifest.generation == 1 and manifest.layer == -1 and manifest.dim == 16
    assert manifest.model.fingerprint == model_fingerprint(model, tok)
    assert manifest.transform.sample_size == 1500 and manifest.index.kind == "ivf_pq"
    assert manifest.index.factory.startswith("IVF") and "_HNSW32,PQ4x8" in manifest.index.factory
    assert 0 < manifest.transform.explained_variance <= 1
    assert manifest.num_docs == 6 and len(manifest.shards) >= 2
    checks, _ = _files_state(store, manifest)
    assert all(checks.values()), checks
    # the archive version the manifest names holds exactly the shards' fragments
    assert manifest.archive is not None and manifest.archive.rows == manifest.num_keys
    assert (store / manifest.archive.manifest.path).is_file()
    assert sorted(p.name for p in (store / "archive.lance" / "data").iterdir()) == sorted(
        s.archive.file.path.rsplit("/", 1)[1] for s in manifest.shards)
    assert len(manifest.archive_files()) == len(manifest.shards) + 1

    tokenizer, eos = load_tokenizer(str(tiny_llama_dir))
    seen = set()
    for shard in manifest.shards:
        tokens = read_tokens(store, shard.shard_id)
        docs = read_docs(store, shard.shard_id)
        pos = key_positions(docs.column("start").to_numpy(), docs.column("length").to_numpy(),
                            len(tokens))
        assert len(tokens) == shard.num_tokens and len(pos) == shard.num_keys
        # the key archive is kept by default: the shard's fragment of archive.lance holds
        # every key, in position order; nothing is staged beside the shard
        assert shard.keys is None
        assert not (store / "shards" / shard.shard_id / "keys.npy").exists()
        assert shard.archive is not None and shard.archive.file.path.startswith(
            "archive.lance/data/")
        assert (store / shard.archive.file.path).is_file()
        positions, keys = read_shard_keys(store, shard)
        assert positions.tolist() == pos.tolist() and keys.shape == (len(pos), 16)
        np.testing.assert_allclose(np.linalg.norm(keys.astype(np.float32), axis=1), 1,
                                   atol=2e-3)
        lists = ListsFile(store / shard.index.path, manifest.index.nlist,
                          manifest.index.code_size)
        ids = np.concatenate([lists.list(i)[1] for i in range(lists.header.nlist)])
        nxt, where = unpack_ids(ids)
        assert sorted(where.tolist()) == pos.tolist() and (tokens[where + 1] == nxt).all()
        lists.check_ids(len(tokens))
        assert read_counts(store, shard.shard_id, manifest.model.vocab_size,
                           shard.num_keys).sum() == shard.num_keys
        for row in read_docs(store, shard.shard_id).to_pylist():
            text = open(row["source"], encoding="utf-8").read()
            want = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            assert tokens[row["start"]:row["start"] + row["length"]].tolist() == want
            seen.add(row["source"].rsplit("/", 1)[1])
    assert seen == {p.name for p in corpus[0].glob("*.py")} - {"latin1.py", "empty.py"}
    reasons = {d.source.rsplit("/", 1)[1]: d.reason for d in read_dead_letters(str(store), 1)}
    assert reasons["empty.py"] == "empty document"
    assert reasons["latin1.py"].startswith("not UTF-8")


def test_build_reports_encode_timing(built_with_stats):
    """What the timings are made of, whatever they measure: every figure present and finite,
    one forward, CPU and done record per shard written, the load once per load."""
    _, manifest, stats = built_with_stats
    timing, metrics = stats["metrics"].encode, stats["metrics"]
    d = metrics.distributions
    assert timing.tokens == manifest.num_tokens and timing.shards == len(manifest.shards)
    assert metrics.counters[ENCODED_TOKENS] == manifest.num_tokens
    for name in (ENCODE_FIRST_MS, ENCODE_DONE_MS, ENCODE_FORWARD_MS, ENCODE_CPU_MS):
        assert name in d, name
    for name, r in d.items():  # merged over steps and workers, still a distribution
        assert r["count"] >= 1 and r["count"] * r["min"] <= r["sum"] <= r["count"] * r["max"], (
            name, r)
    for name in (ENCODE_DONE_MS, ENCODE_FORWARD_MS, ENCODE_CPU_MS):
        assert d[name]["count"] == len(manifest.shards), name  # one per shard written
    # a bundle's first document is timed once, and every bundle that got one wrote a shard
    assert 1 <= d[ENCODE_FIRST_MS]["count"] <= len(manifest.shards)
    assert timing.stage_s == (d[ENCODE_DONE_MS]["max"] - d[ENCODE_FIRST_MS]["min"]) / 1000
    assert timing.forward_s == d[ENCODE_FORWARD_MS]["sum"] / 1000
    assert timing.cpu_s == d[ENCODE_CPU_MS]["sum"] / 1000
    # The model load is reported once per load, by the step that loaded it (none when an
    # earlier build in this process left the shared encoder loaded: pipelines.encoder).
    assert d.get(ENCODER_SETUP_MS, {"count": 0})["count"] == stats["loads"] <= 1
    assert timing.setup_s == d.get(ENCODER_SETUP_MS, {"sum": 0})["sum"] / 1000
    figures = (timing.stage_s, timing.forward_s, timing.cpu_s, timing.setup_s,
               timing.tokens_per_s)
    assert all(math.isfinite(x) for x in figures), figures
    assert timing.tokens_per_s == (timing.tokens / timing.stage_s if timing.stage_s else 0.0)


def test_a_shard_filled_with_another_quantizer_is_never_recorded(built, tmp_path):
    """The run records a shard, and writes its result, only if the shard's lists were filled
    with the quantizer it commits (on a cluster, a lost worker can make the engine train the
    quantizer again): otherwise one clear error, and nothing is recorded."""
    from pipelines.documents import FilledShard
    from pipelines.fit import load_fitted
    from pipelines.journal import QuantizerChangedError, RunJournal, recorded_shards

    store, manifest = built
    fitted = load_fitted(str(store), manifest)
    info = manifest.shards[0]
    other = "f" * 64
    assert other != fitted.index_spec.quantizer.sha256
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    journal = RunJournal(copy, "build", 0, "a-test-run")
    journal.start()
    try:
        with pytest.raises(QuantizerChangedError, match=f"shard {info.shard_id} was filled "
                           f"with quantizer {other[:12]}, but this run's quantizer is now "
                           f"{fitted.index_spec.quantizer.sha256[:12]}.*rerun the same command"):
            journal.record_shard(FilledShard(info, other), fitted)
        assert recorded_shards(journal.io, journal.relpath) == []
        with pytest.raises(QuantizerChangedError):
            journal.write_result([FilledShard(info, other)], fitted)
        same = FilledShard(info, fitted.index_spec.quantizer.sha256)
        assert journal.record_shard(same, fitted) == same
        assert [r["shard"] for r in recorded_shards(journal.io, journal.relpath)] == [info]
        assert journal.write_result([same], fitted) == 1
    finally:
        journal.stop(ended=True)


def test_update_adds_a_generation_and_leaves_the_first_untouched(
        built, corpus, tiny_llama_dir, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(built[0], store)
    first = read_manifest(store)
    before = _files_state(store, first)
    # the old corpus again plus three new files: only the new ones are encoded
    manifest = update_store([corpus[0], corpus[1]], store, _config(tiny_llama_dir, dim=8,
                                                                   archive=False))
    assert manifest.generation == 2 and manifest.parent_generation == 1
    assert manifest.dim == 16  # the store's d, not the config's
    assert manifest.num_docs == first.num_docs + 3
    assert manifest.shards[:len(first.shards)] == first.shards
    new = manifest.shards[len(first.shards):]
    assert {s.generation_added for s in new} == {2}
    # the store keeps an archive, so the update does too (whatever its config said): a
    # new archive version holding the first generation's fragments and the new ones
    assert all(s.archive is not None and (store / s.archive.file.path).is_file() for s in new)
    assert manifest.archive.rows == manifest.num_keys
    assert manifest.archive.version > first.archive.version
    assert manifest.archive.manifest.path != first.archive.manifest.path
    assert manifest.transform == first.transform and manifest.index == first.index
    assert _files_state(store, read_manifest(store, 1)) == before
    assert list_generations(store) == [1, 2]

    # nothing new: no generation is added
    again = update_store(corpus[1], store, _config(tiny_llama_dir))
    assert again.generation == 2 and list_generations(store) == [1, 2]

    # compaction merges every shard into one, same keys, old generations intact
    compacted = compact_store(store, shard_tokens=10**9)
    assert compacted.generation == 3 and len(compacted.shards) == 1
    assert (compacted.num_docs, compacted.num_tokens, compacted.num_keys) == (
        manifest.num_docs, manifest.num_tokens, manifest.num_keys)
    assert _keys_by_doc(store, compacted) == _keys_by_doc(store, manifest)
    assert _files_state(store, read_manifest(store, 1)) == before
    assert _files_state(store, read_manifest(store, 2))[0] == {
        f.path: True for f in manifest.files()}
    # ... and the archive follows: the merged shard's one fragment holds every key once,
    # under its new id and rebased positions, in a new version
    [merged] = compacted.shards
    assert merged.archive is not None and compacted.archive.rows == compacted.num_keys
    assert compacted.archive.version > manifest.archive.version
    assert merged.archive.file.path not in {s.archive.file.path for s in manifest.shards}
    archived = _archived_keys(store, compacted)
    assert archived.keys() == _archived_keys(store, manifest).keys()
    for doc_id, (tokens, keys) in _archived_keys(store, manifest).items():
        assert archived[doc_id][0] == tokens
        np.testing.assert_array_equal(archived[doc_id][1], keys)


def _keys_by_doc(store, manifest):
    """doc_id -> (tokens, index entries (next token, offset in the document, code)) over all
    shards of a manifest: what a search can find, wherever the document lives."""
    out = {}
    for s in manifest.shards:
        tokens = read_tokens(store, s.shard_id)
        lists = ListsFile(store / s.index.path)
        entries = []
        for i in range(lists.header.nlist):
            codes, ids = lists.list(i)
            nxt, pos = unpack_ids(ids)
            entries += [(int(p), int(t), i, c.tobytes()) for p, t, c in zip(pos, nxt, codes)]
        entries.sort()
        starts = np.array([e[0] for e in entries])
        for row in read_docs(store, s.shard_id).to_pylist():
            a, b = np.searchsorted(starts, [row["start"], row["start"] + row["length"]])
            out[row["doc_id"]] = (
                tokens[row["start"]:row["start"] + row["length"]].tobytes(),
                [(p - row["start"], t, lst, c) for p, t, lst, c in entries[a:b]])
    return out


def test_update_with_another_model_is_refused(built, corpus, tiny_model_dirs):
    store, manifest = built
    with pytest.raises(StoreFormatError, match="not the model this store was built with"):
        update_store(corpus[1], store, _config(tiny_model_dirs["qwen2"]))
    assert list_generations(store) == [1]


def test_build_refuses_an_existing_store_and_a_corpus_without_documents(
        built, corpus, tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="already a store"):
        build_store(corpus[1], built[0], _config(tiny_llama_dir))
    with pytest.raises(ValueError, match="not a store's"):  # corpus and store swapped
        build_store(corpus[1], corpus[0], _config(tiny_llama_dir))
    assert not (corpus[0] / "shards").exists()
    leftover = tmp_path / "st" / "dead_letter"
    leftover.mkdir(parents=True)
    (leftover / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="inside the store directory"):
        build_store(tmp_path / "st", tmp_path / "st", _config(tiny_llama_dir, glob="**/*.py"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"prompt": "no response"}\nnot json\n')
    with pytest.raises(ValueError, match="no usable documents"):
        build_store(bad / "a.jsonl", tmp_path / "s", _config(tiny_llama_dir))
    assert not (tmp_path / "s" / "CURRENT").exists()
    assert {d.reason.split(":")[0] for d in read_dead_letters(str(tmp_path / "s"), 1)} == {
        "missing field 'response'", "malformed JSON"}
    with pytest.raises(FileNotFoundError, match="no files match"):
        build_store(bad, tmp_path / "t", _config(tiny_llama_dir))


def test_multiprocessing_ivf_pq_build_matches_in_memory(tmp_path, corpus, tiny_llama_dir):
    """Every step pickles: worker processes build the same store as the in-process runner."""
    records = tmp_path / "chat.jsonl"
    with open(records, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Write function {i}.", "response": f"def f{i}(x):\n"
                                f"    return x * {i} + {i * i}\n"}) + "\n")
    small = [records, *sorted(corpus[1].glob("*.py"))[:1]]
    config = _config(tiny_llama_dir, index_kind="ivf_pq", pq_m=4, pq_nbits=4, sample_size=800)
    a = build_store(small, tmp_path / "a", config)
    b = build_store(small, tmp_path / "b", config, beam_args=[
        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    for m in (a, b):
        assert (m.index.kind, m.index.pq_m, m.index.pq_nbits) == ("ivf_pq", 4, 4)
        assert m.num_docs == 41
    assert (a.num_tokens, a.num_keys) == (b.num_tokens, b.num_keys)
    assert a.transform.file.sha256 == b.transform.file.sha256
    ka, kb = _archived_keys(tmp_path / "a", a), _archived_keys(tmp_path / "b", b)
    assert ka.keys() == kb.keys()
    for doc_id in ka:
        assert ka[doc_id][0] == kb[doc_id][0]
        np.testing.assert_allclose(ka[doc_id][1], kb[doc_id][1], atol=2e-3)
    q = faiss.read_index(str(tmp_path / "b" / b.index.quantizer.path))
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(q)), faiss.IndexIVFPQ)
    assert b.index.code_size == 2  # 4 codes of 4 bits


def _archived_keys(store, manifest):
    """doc_id -> (tokens, float32 keys) from the key archive (each shard's fragment)."""
    out = {}
    for s in manifest.shards:
        tokens = read_tokens(store, s.shard_id)
        positions, keys = read_shard_keys(store, s)
        for row in read_docs(store, s.shard_id).to_pylist():
            span = slice(row["start"], row["start"] + row["length"] - 1)
            rows = slice(*np.searchsorted(positions, [span.start, span.stop]))
            assert positions[rows].tolist() == list(range(span.start, span.stop))
            out[row["doc_id"]] = (tokens[span].tobytes(), keys[rows].astype(np.float32))
    return out


def test_cli_build_info_update_compact(tmp_path, corpus, tiny_llama_dir, capsys):
    store = str(tmp_path / "s")
    common = ["--dim", "8", "--sample-size", "1000", "--glob", "*.py", "--shard-tokens", "15000",
              "--no-progress"]
    files = sorted(corpus[1].glob("*.py"))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    shutil.copy(files[0], one)
    shutil.copy(files[1], two)
    assert dresd_main(["build", store, str(one), "--model", str(tiny_llama_dir), *common,
                       "--no-archive", "--direct_num_workers=1"]) == 0
    assert "generation 1:" in capsys.readouterr().out
    assert dresd_main(["update", store, str(one), str(two), "--glob", "*.py",
                       "--no-progress"]) == 0
    assert "generation 2:" in capsys.readouterr().out
    assert dresd_main(["compact", store]) == 0
    assert "generation 3: 1 shard(s)" in capsys.readouterr().out
    assert dresd_main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = read_manifest(store)
    assert [g["generation"] for g in info["generations"]] == [1, 2, 3]
    assert [g["current"] for g in info["generations"]] == [False, False, True]
    assert (info["docs"], info["tokens"], info["keys"]) == (2, manifest.num_tokens,
                                                            manifest.num_keys)
    # --no-archive: the fragments were dropped after the fill, and the update (which keeps
    # the store's choice) and the compaction wrote none
    for g in (1, 2, 3):
        m = read_manifest(store, g)
        assert m.archive is None and all(s.archive is None for s in m.shards)
        assert m.archive_files() == () and m.files() == m.serving_files()
        assert "archive" not in json.loads(generation_path(store, g).read_text())
    data = tmp_path / "s" / "archive.lance" / "data"
    assert not data.exists() or not any(data.iterdir())
    assert not (tmp_path / "s" / "archive.lance" / "_versions").exists()
    s = manifest.shards[0]
    assert info["bytes"]["archive"] == 0 and info["bytes"]["index"] == s.index.bytes
    assert info["bytes_per_token"]["values"] == pytest.approx(s.tokens.bytes / s.num_tokens)
    assert info["bytes"]["serving"] == info["bytes"]["total"] == sum(
        info["bytes"][k] for k in ("values", "index", "docs", "shared"))
    assert dresd_main(["info", store]) == 0
    text = capsys.readouterr().out
    assert "per token" in text and "compact" in text and "serving set" in text
    assert dresd_main(["update", store, str(two), "--model", "/nonexistent"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
