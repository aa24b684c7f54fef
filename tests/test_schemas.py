import json
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.archive import archive_table, write_fragment
from schemas import StoreFormatError, file_digest, read_manifest
from schemas.archive import ARCHIVE_COLUMNS, fragment_rows, keys_of, read_shard_keys
from schemas.lists import (
    MAX_POSITION,
    MAX_VOCAB,
    TOKEN_SHIFT,
    ListsFile,
    pack_ids,
    read_lists_header,
    token_id_range,
    unpack_ids,
    write_lists,
)
from schemas.manifest import validate_manifest_dict
from schemas.shard_io import (
    ShardData,
    key_positions,
    read_docs,
    read_tokens,
    write_shard,
)


def _shard():
    return ShardData(
        tokens=np.arange(20, dtype=np.int32),
        doc_ids=["a", "b"],
        sources=["x.py", "y.py"],
        starts=np.array([0, 10]),
        lengths=np.array([10, 10]),
        vectors=np.random.default_rng(0).standard_normal((20, 8)),
    )


def test_shard_round_trip(tmp_path):
    sid = write_shard(tmp_path, _shard())
    tokens = read_tokens(tmp_path, sid)
    assert tokens.dtype == np.int32 and tokens.tolist() == list(range(20))
    assert key_positions(np.array([0, 10]), np.array([10, 10]), 20).tolist() == [
        *range(9), *range(10, 19)]
    assert read_docs(tmp_path, sid).column("start").to_pylist() == [0, 10]
    # the keys are not written with the shard (they go into the archive), and nothing
    # half-written is left behind
    assert sorted(p.name for p in (tmp_path / "shards" / sid).iterdir()) == [
        "docs.arrow", "tokens.arrow"]
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [sid]


def test_archive_fragment_round_trip(tmp_path):
    data = _shard()
    sid = write_shard(tmp_path, data)
    pos = key_positions(data.starts, data.lengths, len(data.tokens))
    doc_ids = np.array(data.doc_ids, object)[np.repeat([0, 1], 10)[pos]]
    fragment = write_fragment(tmp_path, archive_table(sid, pos, data.tokens[pos + 1], doc_ids,
                                                      data.vectors[pos]))
    # one data file under archive.lance/data, checksummed, named by its Lance metadata
    rel = fragment.file.path
    assert rel.startswith("archive.lance/data/") and rel.endswith(".lance")
    assert (tmp_path / rel).stat().st_size == fragment.file.bytes
    assert file_digest(tmp_path / rel) == (fragment.file.sha256, fragment.file.bytes)
    assert [f["path"] for f in json.loads(fragment.lance)["files"]] == [rel.rsplit("/", 1)[1]]
    # the rows: every position that has a key, in order, with its next token and document
    rows = fragment_rows(tmp_path, rel)
    assert tuple(rows.schema.names) == ARCHIVE_COLUMNS and rows.num_rows == len(pos) == 18
    assert set(rows.column("shard").to_pylist()) == {sid}
    assert rows.column("next_token").to_pylist() == data.tokens[pos + 1].tolist()
    assert rows.column("doc_id").to_pylist() == ["a"] * 9 + ["b"] * 9
    keys = keys_of(rows)
    assert keys.shape == (18, 8) and keys.dtype == np.float16
    np.testing.assert_array_equal(keys, data.vectors[pos].astype(np.float16))
    # only some rows
    np.testing.assert_array_equal(keys_of(fragment_rows(tmp_path, rel, np.array([0, 17]))),
                                  keys[[0, 17]])
    # read back per shard: (positions, keys)
    positions, got = read_shard_keys(tmp_path, SimpleNamespace(shard_id=sid, archive=fragment))
    assert positions.dtype == np.int64 and positions.tolist() == pos.tolist()
    np.testing.assert_array_equal(got, keys)
    with pytest.raises(StoreFormatError, match="has no key archive"):
        read_shard_keys(tmp_path, SimpleNamespace(shard_id=sid, archive=None))
    (tmp_path / "archive.lance" / "data" / "junk.lance").write_bytes(b"not lance")
    with pytest.raises(StoreFormatError, match="not a readable Lance data file"):
        fragment_rows(tmp_path, "archive.lance/data/junk.lance")


def test_directory_digest_changes_with_content(tmp_path):
    sid = write_shard(tmp_path, _shard())
    d1, n1 = file_digest(tmp_path / "shards" / sid)
    (tmp_path / "shards" / sid / "tokens.arrow").write_bytes(b"corrupt")
    d2, n2 = file_digest(tmp_path / "shards" / sid)
    assert d1 != d2 and n1 != n2


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreFormatError, match="not a dresd store"):
        read_manifest(tmp_path)


def test_manifest_version_and_fields_are_checked():
    with pytest.raises(StoreFormatError, match="format version"):
        validate_manifest_dict({"format_version": 99})
    with pytest.raises(StoreFormatError, match="invalid manifest"):
        validate_manifest_dict({"format_version": 2, "generation": 1})
    # the schema file itself is valid JSON
    from schemas.manifest import _SCHEMA_PATH

    json.loads(_SCHEMA_PATH.read_text())


def test_a_format_1_store_is_told_how_to_convert():
    with pytest.raises(StoreFormatError, match=r"store format 1 is no longer supported .*"
                       r"rebuild it from its corpus with `dresd build NEW_STORE CORPUS\.\.\.`"):
        validate_manifest_dict({"format_version": 1, "generation": 1})


def test_ids_pack_token_and_position():
    tokens = np.array([0, 5, 49151, MAX_VOCAB - 1])
    pos = np.array([0, 123, MAX_POSITION - 1, 7])
    ids = pack_ids(tokens, pos)
    assert ids.dtype == np.int64 and (ids >= 0).all()
    back_t, back_p = unpack_ids(ids)
    assert back_t.tolist() == tokens.tolist() and back_p.tolist() == pos.tolist()
    lo, hi = token_id_range(5)
    assert lo <= ids[1] < hi and not lo <= ids[0] < hi and hi - lo == 1 << TOKEN_SHIFT
    # ids sort by next token first, position second
    assert np.argsort(pack_ids([2, 1, 1], [0, 9, 3])).tolist() == [2, 1, 0]
    with pytest.raises(StoreFormatError, match="positions must lie"):
        pack_ids([1], [MAX_POSITION])
    with pytest.raises(StoreFormatError, match="token ids must lie"):
        pack_ids([MAX_VOCAB], [0])


def test_lists_file_round_trip_and_bad_files(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    sizes = np.array([2, 0, 3])
    lists = [(rng.integers(0, 255, (n, 4), dtype=np.uint8),
              np.sort(pack_ids(rng.integers(0, 9, n), rng.integers(0, 50, n))))
             for n in sizes]
    path = tmp_path / "ivf.lists"
    write_lists(path, 3, 4, sizes, lists)
    f = ListsFile(path, 3, 4)
    assert f.header.sizes.tolist() == [2, 0, 3] and f.header.num_entries == 5
    for i in range(3):
        codes, ids = f.list(i)
        assert codes.tolist() == lists[i][0].tolist() and ids.tolist() == lists[i][1].tolist()
    # faiss reads the same file, memory-mapped
    il = faiss.read_InvertedLists(faiss.FileIOReader(str(path)), faiss.IO_FLAG_MMAP)
    assert il.nlist == 3 and il.code_size == 4 and il.list_size(2) == 3
    with pytest.raises(StoreFormatError, match="has 3 lists, the store's quantizer 4"):
        read_lists_header(path, nlist=4)
    with pytest.raises(StoreFormatError, match="codes of 4 bytes"):
        read_lists_header(path, code_size=16)
    data = path.read_bytes()
    (tmp_path / "short.lists").write_bytes(data[:-3])
    with pytest.raises(StoreFormatError, match="truncated or padded"):
        read_lists_header(tmp_path / "short.lists")
    (tmp_path / "junk.lists").write_bytes(b"nope" + data[4:])
    with pytest.raises(StoreFormatError, match="not an inverted-list file"):
        read_lists_header(tmp_path / "junk.lists")
    f.check_ids(num_tokens=60, vocab_size=9)
    with pytest.raises(StoreFormatError, match="outside the shard"):
        f.check_ids(num_tokens=10)
