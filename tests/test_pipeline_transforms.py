"""Each builder PTransform on Beam's TestPipeline with a tiny random model and real files."""

import json
from pathlib import Path

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from dresd.models import load_model
from pipelines.archive import write_fragment
from pipelines.config import BuildConfig
from pipelines.dedupe import DroppedSources, FindDroppedSources, source_key
from pipelines.documents import ChatDocument, TextDocument, TokenizedDoc, WrittenShard
from pipelines.encode import EncodeShards, archive_rows
from pipelines.fit import FitTransform, fit_keys, train_index
from pipelines.forward import split_windows, token_budget_batches
from pipelines.index import FillShardIndex, fill_shard_index
from pipelines.journal import RunJournal
from pipelines.options import pipeline_options
from pipelines.publish import RecordResult, commit_generation
from pipelines.readers import DEAD, ReadCorpus, batch_files
from pipelines.sample import SampleStates, SmallestHashDocs
from pipelines.tokenize import Tokenize, load_tokenizer, tokenized
from schemas import ModelSpec, StoreFormatError, read_manifest
from schemas.archive import ARCHIVE_COLUMNS, fragment_rows, keys_of, read_shard_keys
from schemas.lists import ListsFile, unpack_ids
from schemas.manifest import make_file_ref
from schemas.shard_io import (
    ShardData,
    key_positions,
    read_counts,
    read_docs,
    read_tokens,
    write_shard,
)
from schemas.storage import store_io


def beam_test_pipeline():
    return BeamTestPipeline(options=pipeline_options(None))


def _config(model_dir, **kw):
    return BuildConfig(**{"model": str(model_dir), "dim": 8, "sample_size": 600,
                          "progress": False, **kw})


def test_read_corpus_sorts_good_records_from_dead_letters(tmp_path):
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_bytes(b"\n".join([
        json.dumps({"q": "What is 2+2?", "a": "4"}).encode(),
        b'{"q": "unterminated',
        json.dumps({"q": "no answer"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"q": "number answer", "a": 4}).encode(),
        b'{"q": "caf\xe9", "a": "latin-1 bytes"}',
        b'{"q": "lone surrogate", "a": "\\ud800"}',  # valid JSON, no UTF-8 encoding
        b"",
    ]))
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"q": ["hi", "empty"], "a": ["hello", " "]}), parquet)
    bad_parquet = tmp_path / "other.parquet"
    pq.write_table(pa.table({"question": ["x"]}), bad_parquet)
    (tmp_path / "good.txt").write_text("def f():\n    return 1\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"ok\xff\xfe")
    (tmp_path / "huge.txt").write_text("x" * 5000)
    files = [str(p) for p in (jsonl, parquet, bad_parquet)] + [
        str(tmp_path / n) for n in ("good.txt", "empty.txt", "binary.txt", "huge.txt")]

    with beam_test_pipeline() as p:
        out = p | ReadCorpus(batch_files(files, 100), "q", "a", max_doc_bytes=4000)
        assert_that(out.docs | beam.Map(lambda d: (type(d).__name__, d.source)), equal_to([
            ("ChatDocument", f"{jsonl}:1"),
            ("ChatDocument", f"{parquet}#0"),
            ("TextDocument", str(tmp_path / "good.txt")),
        ]), label="docs")
        assert_that(out[DEAD] | beam.Map(lambda d: (d.source, d.reason.split(":")[0])), equal_to([
            (f"{jsonl}:2", "malformed JSON"),
            (f"{jsonl}:3", "missing field 'a'"),
            (f"{jsonl}:4", "record is a list, not an object"),
            (f"{jsonl}:5", "field 'a' is int, not a string"),
            (f"{jsonl}:6", "not UTF-8"),
            (f"{jsonl}:7", "field 'a' is not UTF-8 text"),
            (f"{parquet}#1", "empty field 'a'"),
            (str(bad_parquet), "missing field 'q' (columns"),
            (str(tmp_path / "empty.txt"), "empty document"),
            (str(tmp_path / "binary.txt"), "not UTF-8"),
            (str(tmp_path / "huge.txt"), "document is 5000 bytes, over the limit of 4000"),
        ]), label="dead")


def test_tokenize_applies_the_chat_template_and_ends_files_with_eos(tiny_llama_dir):
    tokenizer, eos = load_tokenizer(str(tiny_llama_dir))
    chat = ChatDocument("c.jsonl:1", "Add one.", "x + 1")
    text = TextDocument("t.py", "import os\n")
    want_chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add one."}, {"role": "assistant", "content": "x + 1"}],
        tokenize=True, return_dict=False)
    want_text = tokenizer("import os\n", add_special_tokens=False)["input_ids"] + [eos]
    assert want_text[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")

    with beam_test_pipeline() as p:
        out = p | beam.Create([chat, text]) | Tokenize(str(tiny_llama_dir))
        assert_that(out.tokenized | beam.Map(lambda d: (d.source, d.doc_id, d.tokens.tolist())),
                    equal_to([("c.jsonl:1", chat.doc_id, want_chat),
                              ("t.py", text.doc_id, want_text)]))


def test_document_ids_are_content_hashes():
    assert TextDocument("a.py", "x = 1\n").doc_id == TextDocument("b.py", "x = 1\n").doc_id
    assert TextDocument("a.py", "x = 1\n").doc_id != TextDocument("a.py", "x = 2\n").doc_id
    assert ChatDocument("a", "p", "r").doc_id == ChatDocument("b", "p", "r").doc_id
    assert ChatDocument("a", "p", "r").doc_id != ChatDocument("a", "pr", "").doc_id


def test_batch_files_cuts_the_corpus_in_order_into_batches_of_about_the_size(tmp_path):
    sizes = [30, 30, 50, 200, 10, 10]
    files = []
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"f{i}.txt"))
        Path(files[-1]).write_text("x" * n)
    batches = batch_files(files, 100)
    assert batches == [files[:2], files[2:3], files[3:4], files[4:]]  # 200 alone: one file
    assert batch_files([], 100) == []


def test_find_dropped_sources_names_store_contents_and_repeated_copies(tmp_path):
    known = TextDocument("old.py", "old\n")
    sid = write_shard(tmp_path, ShardData(
        tokens=np.array([5, 6], np.int32), doc_ids=[known.doc_id], sources=["old.py"],
        starts=np.array([0]), lengths=np.array([2]), vectors=np.zeros((2, 4), np.float16)))
    docs = [known, TextDocument("new.py", "new\n"), TextDocument("copy.py", "new\n"),
            TextDocument("other.py", "other\n")]
    with beam_test_pipeline() as p:
        out = p | beam.Create(docs) | FindDroppedSources(str(tmp_path), [sid])
        # The copy kept is the first source in sorted order: copy.py, on every runner.
        assert_that(out | beam.Map(lambda d: sorted(
            s for s in ("old.py", "new.py", "copy.py", "other.py") if s in d)),
            equal_to([["new.py", "old.py"]]))


def test_dropped_sources_is_exact_for_its_keys():
    dropped = DroppedSources(source_key(f"f{i}.py") for i in range(0, 1000, 2))
    assert len(dropped) == 500
    assert all(f"f{i}.py" in dropped for i in range(0, 1000, 2))
    assert not any(f"f{i}.py" in dropped for i in range(1, 1000, 2))
    assert "anything" not in DroppedSources([])


def test_second_read_skips_dropped_documents_and_dead_letters(tmp_path):
    for name, text in (("a.txt", "one\n"), ("b.txt", "one\n"), ("c.txt", "two\n"),
                       ("d.txt", " ")):
        (tmp_path / name).write_text(text)
    batches = batch_files(sorted(str(p) for p in tmp_path.glob("*.txt")), 10)
    with beam_test_pipeline() as p:
        first = p | "First" >> ReadCorpus(batches)
        dropped = first.docs | FindDroppedSources(str(tmp_path), [])
        second = p | "Second" >> ReadCorpus(batches, dropped=dropped)
        assert_that(first[DEAD] | beam.Map(lambda d: Path(d.source).name), equal_to(["d.txt"]),
                    label="first read's dead letters")
        assert_that(second.docs | beam.Map(lambda d: Path(d.source).name),
                    equal_to(["a.txt", "c.txt"]), label="kept")
        assert_that(second[DEAD], equal_to([]), label="reported once")


def _docs(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [TokenizedDoc(f"{i:064x}", f"doc{i}", rng.integers(3, 300, length).astype(np.int32))
            for i in range(n)]


def test_smallest_hash_docs_keeps_just_enough_tokens():
    docs = _docs(10, 50)
    fn = SmallestHashDocs(120, size_of=len)
    a = fn.create_accumulator()
    for d in docs[5:]:
        a = fn.add_input(a, d)
    b = fn.create_accumulator()
    for d in reversed(docs[:5]):
        b = fn.add_input(b, d)
    picked = fn.extract_output(fn.merge_accumulators([a, b]))
    assert [d.source for d in picked] == ["doc0", "doc1", "doc2"]  # 150 tokens >= 120 > 100


def test_sample_states_are_the_models_hidden_states(tiny_llama_dir):
    # Text documents of 30-90 tokens: the smallest ids until 8 x 2 x 100 characters are picked
    # and tokenized, and encoded only up to 200 tokens in all.
    docs = [TextDocument(f"doc{i}.py", f"def f{i}(x):\n    return x * {i}\n" * (3 + i % 4))
            for i in range(40)]
    config = _config(tiny_llama_dir, sample_size=100)
    tokenizer, eos = load_tokenizer(str(tiny_llama_dir))
    picked, chars = [], 0
    for d in sorted(docs, key=lambda d: d.doc_id):
        picked.append(tokenized(tokenizer, eos, d).tokens)
        chars += len(d.text)
        if chars >= 1600:
            break
    with beam_test_pipeline() as p:
        states = p | beam.Create(docs) | SampleStates(config)
        assert_that(states | beam.Map(lambda s: (s.shape, str(s.dtype))),
                    equal_to([((100, 64), "float32")]))
        # every sampled state is one of those positions' real hidden states
        model, _ = load_model(tiny_llama_dir)
        want, budget = [], 200
        with torch.no_grad():
            for tokens in picked:
                ids = torch.tensor(tokens[:budget][None], dtype=torch.long)
                want.append(model.base_model(ids).last_hidden_state[0].numpy())
                budget -= ids.shape[1]
                if budget <= 0:
                    break
        want = np.concatenate(want)
        assert len(want) == 200

        def all_rows_found(s):
            dist = ((s[:, None, :] - want[None]) ** 2).sum(-1).min(1)
            assert dist.max() < 1e-6, dist.max()
            return True

        assert_that(states | beam.Map(all_rows_found), equal_to([True]), label="rows")


def test_fit_transform_writes_the_transform_and_train_index_the_quantizer(tmp_path):
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((300, 32)).astype(np.float32) for _ in range(2)]
    config = BuildConfig(dim=8, nlist=0, progress=False)
    with beam_test_pipeline() as p:
        fitted = p | beam.Create(states) | FitTransform(config, str(tmp_path))
        assert_that(fitted | beam.Map(lambda f: (f.transform_spec.dim, f.transform_spec.input_dim,
                                                 f.transform_spec.sample_size, f.index_spec,
                                                 f.quantizer)),
                    equal_to([(8, 32, 600, None, None)]))
    [t_file] = (tmp_path / "transform").iterdir()
    assert t_file.suffix == ".npz"
    # the quantizer is trained on stored keys: about 4 sqrt(N) lists, 39 keys per list at most
    fitted = fit_keys(np.concatenate(states), config, str(tmp_path))
    keys = fitted.transform(rng.standard_normal((12_000, 32)).astype(np.float32))
    trained = train_index(keys[:10_000], config, 10_000, str(tmp_path), fitted)
    assert trained.index_spec.nlist == min(400, 10_000 // 39) == 256
    assert trained.index_spec.kind == "ivf_pq" and trained.index_spec.pq_m == 2
    assert trained.index_spec.code_size == 2 and trained.index_spec.train_size == 10_000
    assert trained.index_spec.factory == "IVF256_HNSW32,PQ2x8"
    [q_file] = (tmp_path / "index").iterdir()
    q = faiss.read_index(str(q_file))
    assert q.is_trained and q.ntotal == 0 and q.metric_type == faiss.METRIC_INNER_PRODUCT
    assert faiss.extract_index_ivf(q).nlist == 256 and faiss.extract_index_ivf(q).nprobe == 16
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(q).quantizer),
                      faiss.IndexHNSWFlat)
    # too few keys to train 256 PQ centroids well: the index keeps them uncompressed
    small = train_index(keys[:9000], config, 9000, str(tmp_path), fitted)
    assert small.index_spec.kind == "ivf_flat" and small.index_spec.code_size == 4 * 8


def test_two_level_training_makes_every_list(tmp_path):
    from pipelines.index import two_level_centroids

    rng = np.random.default_rng(1)
    x = rng.standard_normal((8000, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = two_level_centroids(x, 150, seed=0)
    assert c.shape == (150, 8) and np.isfinite(c).all()


def test_fit_reports_too_small_samples_and_bad_dims(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        fit_keys(np.zeros((1, 16), np.float32), BuildConfig(dim=8), str(tmp_path))
    with pytest.raises(ValueError, match="exceeds the model's hidden size"):
        fit_keys(np.zeros((50, 16), np.float32), BuildConfig(dim=32), str(tmp_path))
    with pytest.raises(ValueError, match="pq_m"):
        BuildConfig(index_kind="ivf_pq", dim=64, pq_m=7)


def test_token_budget_batches_count_padding():
    lengths = [10, 300, 40, 300, 50, 5]
    batches = token_budget_batches(lengths, budget=620)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 620
    assert batches[0] == [1, 3]
    windows = split_windows([np.arange(5), np.arange(7)], max_len=3)
    assert [(w.offset, len(w.tokens)) for w in windows] == [(0, 3), (3, 2), (5, 3), (8, 3), (11, 1)]


def _fitted(tmp_path, model_dir, config):
    """A FittedKeys (transform and quantizer) from the tiny model's states on random tokens."""
    model, _ = load_model(model_dir)
    with torch.no_grad():
        ids = torch.tensor(np.stack([d.tokens for d in _docs(4, 200, seed=9)]), dtype=torch.long)
        states = model.base_model(ids).last_hidden_state.reshape(-1, 64).numpy()
    fitted = fit_keys(states, config, str(tmp_path))
    return train_index(fitted.transform(states), config, 5000, str(tmp_path), fitted)


def test_encode_shards_keys_are_transformed_windowed_forward(tmp_path, tiny_llama_dir):
    config = _config(tiny_llama_dir, max_len=64, batch_tokens=256, shard_tokens=160)
    fitted_value = _fitted(tmp_path, tiny_llama_dir, config)
    docs = [TokenizedDoc("a" * 64, "long", _docs(1, 150, seed=1)[0].tokens),  # 3 windows
            TokenizedDoc("b" * 64, "short", _docs(1, 20, seed=2)[0].tokens),
            TokenizedDoc("c" * 64, "mid", _docs(1, 100, seed=3)[0].tokens)]
    with beam_test_pipeline() as p:
        fitted = p | "Fitted" >> beam.Create([fitted_value])
        shards = p | beam.Create(docs) | EncodeShards(config, str(tmp_path), fitted)
        assert_that(shards | beam.Map(lambda s: (s.num_docs, s.num_tokens, s.num_keys)),
                    _two_shards_closing_at_160_tokens)
        assert_that(shards | "Fragments" >> beam.Map(lambda s: (s.shard_id, s.archive)),
                    _each_shard_has_its_own_fragment(tmp_path), label="Archived")

    model, _ = load_model(tiny_llama_dir)
    by_source = {d.source: d for d in docs}
    shard_ids = sorted(p.name for p in (tmp_path / "shards").iterdir())
    # each shard's keys are one uncommitted fragment of the archive: nothing else holds them
    fragments = {}
    for f in sorted((tmp_path / "archive.lance" / "data").iterdir()):
        rows = fragment_rows(tmp_path, f"archive.lance/data/{f.name}")
        (sid,) = set(rows.column("shard").to_pylist())
        fragments[sid] = rows
    assert sorted(fragments) == shard_ids
    assert not (tmp_path / "archive.lance" / "_versions").exists()  # the launcher commits
    for sid in shard_ids:
        assert sorted(p.name for p in (tmp_path / "shards" / sid).iterdir()) == [
            "docs.arrow", "tokens.arrow"]  # no staged keys beside the shard
        tokens = read_tokens(tmp_path, sid)
        doc_table = read_docs(tmp_path, sid).to_pylist()
        pos = key_positions(np.array([r["start"] for r in doc_table]),
                            np.array([r["length"] for r in doc_table]), len(tokens))
        assert len(pos) == len(tokens) - len(doc_table)
        rows = fragments[sid]
        # row i: the key at pos[i], filed under the token that follows it
        assert rows.column("position").to_pylist() == pos.tolist()
        assert rows.column("next_token").to_pylist() == tokens[pos + 1].tolist()
        vectors = keys_of(rows)
        assert vectors.shape == (len(pos), 8) and vectors.dtype == np.float16
        row_docs = np.array(rows.column("doc_id").to_pylist(), object)
        for row in doc_table:
            doc = by_source[row["source"]]
            assert row["doc_id"] == doc.doc_id
            span = tokens[row["start"]:row["start"] + row["length"]]
            assert span.tolist() == doc.tokens.tolist()
            # windows of max_len=64, each encoded on its own
            want = []
            with torch.no_grad():
                for s in range(0, len(doc.tokens), 64):
                    ids = torch.tensor(doc.tokens[None, s:s + 64], dtype=torch.long)
                    want.append(model.base_model(ids).last_hidden_state[0].numpy())
            want = fitted_value.transform(np.concatenate(want))[:-1]  # last token: no key
            rows_of_doc = (pos >= row["start"]) & (pos < row["start"] + row["length"] - 1)
            assert (row_docs[rows_of_doc] == doc.doc_id).all()
            got = vectors[rows_of_doc].astype(np.float32)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=2e-3)


def _each_shard_has_its_own_fragment(store):
    def check(pairs):
        assert len(pairs) == 2, pairs
        for sid, fragment in pairs:
            assert fragment is not None, sid
            # checksummed as written, one data file of the archive holding only this shard
            assert make_file_ref(store, fragment.file.path) == fragment.file
            assert fragment.file.path.startswith("archive.lance/data/")
            assert set(fragment_rows(store, fragment.file.path).column("shard").to_pylist()) == {
                sid}
        assert len({f.file.path for _, f in pairs}) == 2

    return check


def _two_shards_closing_at_160_tokens(sizes):
    # Whatever order the documents arrive in, a shard closes once it holds >= 160 tokens.
    assert len(sizes) == 2, sizes
    assert sum(s[0] for s in sizes) == 3
    assert sum(s[1] for s in sizes) == 270 and sum(s[2] for s in sizes) == 267
    assert max(s[1] for s in sizes) >= 160


@pytest.mark.parametrize("keep_archive", [True, False])
def test_fill_shard_index_and_publish(tmp_path, tiny_llama_dir, keep_archive):
    config = _config(tiny_llama_dir)
    fitted_value = _fitted(tmp_path, tiny_llama_dir, config)
    rng = np.random.default_rng(0)
    vectors = fitted_value.transform(rng.standard_normal((42, 64)).astype(np.float32))
    tokens = np.arange(42, dtype=np.int32) % 7 + 3
    data = ShardData(
        tokens=tokens, doc_ids=["d1", "d2"], sources=["x", "y"],
        starts=np.array([0, 21]), lengths=np.array([21, 21]), vectors=vectors.astype(np.float16))
    sid = write_shard(tmp_path, data)
    fragment = write_fragment(Path(tmp_path), archive_rows(sid, data))
    spec = ModelSpec(name="tiny", fingerprint="f" * 64, tokenizer_fingerprint="t" * 64,
                     model_type="llama", hidden_size=64, vocab_size=384, eos_token_id=2)
    journal = RunJournal(str(tmp_path), "build", 0, "k").start()
    with beam_test_pipeline() as p:
        fitted = p | "Fitted" >> beam.Create([fitted_value])
        recorded = (p | beam.Create([WrittenShard(sid, 2, 42, 40, archive=fragment)])
                    | FillShardIndex(str(tmp_path), 1, fitted, 384, keep_archive)
                    | RecordResult(journal, fitted))
        assert_that(recorded, equal_to([1]))
    result = journal.read_result()
    journal.stop(ended=False)
    assert result.transform == fitted_value.transform_spec
    commit_generation(store_io(str(tmp_path)), 1, spec, 20, result.transform, result.index,
                      result.shards, None, "test")
    manifest = read_manifest(tmp_path)
    assert manifest.generation == 1 and manifest.note == "test" and manifest.layer == -1
    [shard] = manifest.shards
    assert (shard.shard_id, shard.num_keys, shard.generation_added) == (sid, 40, 1)
    assert shard.keys is None and not (tmp_path / "shards" / sid / "keys.npy").exists()
    if keep_archive:  # the default: the fragment is the generation's archive version
        assert shard.archive == fragment and (tmp_path / fragment.file.path).is_file()
        assert manifest.archive is not None and manifest.archive.rows == 40
        assert manifest.archive.path == "archive.lance"
        assert make_file_ref(tmp_path, manifest.archive.manifest.path) == (
            manifest.archive.manifest)
        positions, keys = read_shard_keys(tmp_path, shard)
        assert positions.tolist() == [*range(20), *range(21, 41)]
        np.testing.assert_array_equal(keys, vectors.astype(np.float16)[positions])
        assert tuple(fragment_rows(tmp_path, shard.archive.file.path).schema.names) == (
            ARCHIVE_COLUMNS)
    else:  # dropped after the fill, never committed
        assert shard.archive is None and manifest.archive is None
        assert not (tmp_path / fragment.file.path).exists()
        assert not (tmp_path / "archive.lance" / "_versions").exists()
        assert "archive" not in json.loads(
            (tmp_path / "manifests" / "gen-000001.json").read_text())
    assert manifest.files() == manifest.serving_files() + manifest.archive_files()
    assert len(manifest.archive_files()) == (2 if keep_archive else 0)
    # every key is in the lists once, its id packing (next token, position), lists sorted
    lists = ListsFile(tmp_path / shard.index.path)
    ids = np.concatenate([lists.list(i)[1] for i in range(lists.header.nlist)])
    nxt, pos = unpack_ids(ids)
    assert sorted(pos.tolist()) == [*range(20), *range(21, 41)]
    assert (tokens[pos + 1] == nxt).all()
    lists.check_ids(42, 384)
    counts = read_counts(tmp_path, sid, 384, 40)
    assert counts.tolist() == np.bincount(tokens[pos + 1], minlength=384).tolist()


def test_fill_shard_index_takes_the_keys_from_the_shards_own_fragment(tmp_path, tiny_llama_dir):
    """The fill refuses a shard without a fragment, and a fragment that is not its keys."""
    fitted_value = _fitted(tmp_path, tiny_llama_dir, _config(tiny_llama_dir))
    rng = np.random.default_rng(1)

    def shard(tokens):
        data = ShardData(tokens=tokens, doc_ids=["d"], sources=["x"], starts=np.array([0]),
                         lengths=np.array([len(tokens)]),
                         vectors=rng.standard_normal((len(tokens), 8)).astype(np.float16))
        sid = write_shard(tmp_path, data)
        return sid, write_fragment(Path(tmp_path), archive_rows(sid, data))

    a, fa = shard(np.arange(30, dtype=np.int32) % 5 + 3)
    b, fb = shard(np.arange(30, dtype=np.int32) % 6 + 3)  # as long, other next tokens
    c, fc = shard(np.arange(12, dtype=np.int32) + 3)
    assert fill_shard_index(tmp_path, a, fitted_value.quantizer, 384, fa) == 29
    keys = keys_of(fragment_rows(tmp_path, fa.file.path))
    assert keys.shape == (29, 8)
    with pytest.raises(StoreFormatError, match="no key archive"):
        fill_shard_index(tmp_path, a, fitted_value.quantizer, 384, None)
    with pytest.raises(StoreFormatError, match="not this shard's keys"):
        fill_shard_index(tmp_path, a, fitted_value.quantizer, 384, fb)
    with pytest.raises(StoreFormatError, match="11 rows for 29 keys"):
        fill_shard_index(tmp_path, a, fitted_value.quantizer, 384, fc)


def test_record_with_no_shards_commits_nothing(tmp_path, tiny_llama_dir):
    config = _config(tiny_llama_dir)
    fitted_value = _fitted(tmp_path, tiny_llama_dir, config)
    journal = RunJournal(str(tmp_path), "build", 0, "k").start()
    with beam_test_pipeline() as p:
        fitted = p | "Fitted" >> beam.Create([fitted_value])
        recorded = p | beam.Create([]) | RecordResult(journal, fitted)
        assert_that(recorded, equal_to([0]))
    journal.stop(ended=False)
    assert journal.read_result().shards == ()
    with pytest.raises(StoreFormatError, match="not a dresd store"):
        read_manifest(tmp_path)


def test_the_fill_assigns_each_key_with_the_fill_beam_not_the_stored_one(tmp_path):
    # 2048 lists of random directions in 16 dimensions: there, the HNSW's top-1 at the stored
    # beam (faiss's default, 16) and at ASSIGN_EF_SEARCH differ for some keys, so a fill that
    # kept the stored beam fails this test.
    from pipelines.index import ASSIGN_EF_SEARCH, fill_lists, index_from_bytes, index_to_bytes

    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    trained = faiss.index_factory(16, "IVF2048_HNSW32,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(trained)
    ivf.quantizer.add(unit(rng.normal(size=(2048, 16))))
    trained.train(unit(rng.normal(size=(4096, 16))))
    stored = index_to_bytes(trained)
    keys = unit(rng.normal(size=(3000, 16)))
    tokens = rng.integers(0, 300, 3001).astype(np.int32)
    positions = np.arange(3000)

    def beam(index):  # the index must outlive the quantizer's proxy
        return faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw

    def top1(ef):
        index = index_from_bytes(stored)
        beam(index).efSearch = ef
        q = faiss.extract_index_ivf(index).quantizer
        return q.search(keys, 1)[1].ravel()

    assert ASSIGN_EF_SEARCH < 16 and (top1(16) != top1(ASSIGN_EF_SEARCH)).any()
    filled = index_from_bytes(stored)
    assert fill_lists(filled, keys, tokens, positions, tmp_path / "ivf.lists") == 3000
    invlists = faiss.extract_index_ivf(filled).invlists
    list_of = np.empty(3000, np.int64)
    for lst in range(2048):
        n = invlists.list_size(lst)
        if n:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy()
            list_of[unpack_ids(ids)[1]] = lst
    np.testing.assert_array_equal(list_of, top1(ASSIGN_EF_SEARCH))
    again = index_from_bytes(stored)
    assert beam(again).efSearch == 16  # the stored quantizer is not changed
