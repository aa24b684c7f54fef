import json

import numpy as np
import pytest

from schemas import StoreFormatError, file_digest, read_manifest
from schemas.manifest import validate_manifest_dict
from schemas.shard_io import ShardData, read_docs, read_keys, read_tokens, write_shard


def _shard():
    return ShardData(
        tokens=np.arange(20, dtype=np.int32),
        doc_ids=["a", "b"],
        sources=["x.py", "y.py"],
        starts=np.array([0, 10]),
        lengths=np.array([10, 10]),
        vectors=np.random.default_rng(0).standard_normal((18, 8)),
        pos=np.r_[0:9, 10:19],
        next_token=np.r_[1:10, 11:20],
    )


def test_shard_round_trip(tmp_path):
    sid = write_shard(tmp_path, _shard())
    tokens = read_tokens(tmp_path, sid)
    assert tokens.dtype == np.int32 and tokens.tolist() == list(range(20))
    vectors, pos, nxt = read_keys(tmp_path, sid)
    assert vectors.shape == (18, 8) and vectors.dtype == np.float16
    assert (tokens[pos + 1] == nxt).all()
    assert read_docs(tmp_path, sid).column("start").to_pylist() == [0, 10]
    # nothing half-written is left behind
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [sid]


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
        validate_manifest_dict({"format_version": 1, "generation": 1})
    # the schema file itself is valid JSON
    from schemas.manifest import _SCHEMA_PATH

    json.loads(_SCHEMA_PATH.read_text())
