"""Checks of a manifest's values against each other, after the JSON schema checked their types.

The schema (manifest.schema.json) can say that a field is an integer >= 1; it cannot say that the
end-of-sequence token lies inside the vocabulary, that the transform maps the model's hidden size
to the store's d, or that a shard's files are that shard's. A manifest that passes both is one
the runtime can open without reading outside its store or allocating from a corrupt number:

- every value a reader sizes memory or loops from is bounded (vocabulary, hidden size, d,
  value_len, nlist, token counts);
- values that describe one thing twice agree (d, the transform's dimensions, key counts);
- every file a shard entry names lies at ``shards/<shard_id>/<file name>`` (its inverted lists
  at ``ivf.lists``, or ``ivf-<16 hex>.lists`` after a re-index), so verifying the entries checks
  exactly the files loading reads; the transform lies under ``transform/``, the quantizer under
  ``index/``, the key archive's files under ``archive.lance/`` (a fragment's Lance metadata names
  its own data file), and its row count is the shards' key count.

Each violation is a ``StoreFormatError`` that names the field (as a path, like
``shards/3/num_keys``) and the values, never the file's contents beyond them.
"""

from __future__ import annotations

import json
import re

from schemas.errors import StoreFormatError
from schemas.layout import (
    ARCHIVE_DATA_DIR,
    ARCHIVE_VERSIONS_DIR,
    COUNTS_FILE,
    DOCS_FILE,
    KEYS_FILE,
    TOKENS_FILE,
)
from schemas.lists import MAX_POSITION, MAX_VOCAB

MAX_HIDDEN = 1 << 16  # hidden sizes of today's largest models are ~2^14
MAX_VALUE_LEN = 1024  # tokens sliced per value; drafts are a few dozen at most
MAX_NLIST = 1 << 24  # ~4 sqrt(N) lists: 2^24 would serve 10^13 keys
MAX_NPROBE = 1 << 16
LISTS_NAME = re.compile(r"ivf(-[0-9a-f]{16})?\.lists")  # ivf.lists, or a re-index's
ARCHIVE_FILE = re.compile(re.escape(ARCHIVE_DATA_DIR) + r"/[A-Za-z0-9_-]{1,128}\.lance")
ARCHIVE_MANIFEST = re.compile(re.escape(ARCHIVE_VERSIONS_DIR) + r"/[0-9]{1,20}\.manifest")


def _fail(where: str, what: str) -> None:
    raise StoreFormatError(f"invalid manifest at {where}: {what}")


def _at_most(d: dict, where: str, key: str, limit: int) -> None:
    if d[key] > limit:
        _fail(f"{where}{key}", f"{d[key]} is larger than the {limit} this format allows")


def check_ranges(d: dict) -> None:
    """Raise StoreFormatError unless the schema-valid manifest ``d`` is consistent (see the
    module docstring)."""
    model, transform, index = d["model"], d["transform"], d["index"]
    _at_most(model, "model/", "vocab_size", MAX_VOCAB)
    _at_most(model, "model/", "hidden_size", MAX_HIDDEN)
    if model["eos_token_id"] >= model["vocab_size"]:
        _fail("model/eos_token_id", f"{model['eos_token_id']} is outside the vocabulary of "
              f"{model['vocab_size']} tokens")
    _at_most(d, "", "value_len", MAX_VALUE_LEN)
    if d["dim"] > model["hidden_size"]:
        _fail("dim", f"{d['dim']} exceeds the model's hidden size {model['hidden_size']}")
    if (transform["input_dim"], transform["dim"]) != (model["hidden_size"], d["dim"]):
        _fail("transform", f"maps {transform['input_dim']} -> {transform['dim']} dimensions, "
              f"the store's are {model['hidden_size']} -> {d['dim']}")
    if not transform["file"]["path"].startswith("transform/"):
        _fail("transform/file/path", "the transform lies outside transform/")

    _at_most(index, "index/", "nlist", MAX_NLIST)
    _at_most(index, "index/", "nprobe", MAX_NPROBE)
    if index["kind"] == "ivf_pq":
        if not (index["pq_m"] >= 1 and d["dim"] % index["pq_m"] == 0):
            _fail("index/pq_m", f"{index['pq_m']} does not divide d={d['dim']}")
        if not 1 <= index["pq_nbits"] <= 16:
            _fail("index/pq_nbits", f"{index['pq_nbits']} is not 1..16")
    if not index["quantizer"]["path"].startswith("index/"):
        _fail("index/quantizer/path", "the quantizer lies outside index/")

    generation, parent = d["generation"], d.get("parent_generation")
    if parent is not None and not 1 <= parent < generation:
        _fail("parent_generation", f"{parent} is not an earlier generation than {generation}")
    files = {"tokens": TOKENS_FILE, "docs": DOCS_FILE, "counts": COUNTS_FILE, "keys": KEYS_FILE}
    seen: set[str] = set()
    for i, s in enumerate(d["shards"]):
        where = f"shards/{i}/"
        sid = s["shard_id"]
        if sid in seen:
            _fail(f"{where}shard_id", f"shard {sid} is listed twice")
        seen.add(sid)
        if s["generation_added"] > generation:
            _fail(f"{where}generation_added", f"{s['generation_added']} is after this "
                  f"generation ({generation})")
        _at_most(s, where, "num_tokens", MAX_POSITION - 1)
        if s["num_docs"] > s["num_tokens"]:
            _fail(f"{where}num_docs", f"{s['num_docs']} documents in {s['num_tokens']} tokens")
        if s["num_keys"] != s["num_tokens"] - s["num_docs"]:
            _fail(f"{where}num_keys", f"{s['num_keys']} keys, but {s['num_tokens']} tokens in "
                  f"{s['num_docs']} documents make {s['num_tokens'] - s['num_docs']}")
        for field, name in files.items():
            ref = s.get(field)
            if ref is not None and ref["path"] != f"shards/{sid}/{name}":
                _fail(f"{where}{field}/path", f"names {ref['path']!r}, not this shard's "
                      f"shards/{sid}/{name}")
        lists = s["index"]["path"]
        if not (lists.startswith(f"shards/{sid}/")
                and LISTS_NAME.fullmatch(lists[len(f"shards/{sid}/"):])):
            _fail(f"{where}index/path", f"names {lists!r}, not this shard's "
                  f"shards/{sid}/ivf.lists (or ivf-<16 hex digits>.lists)")
        if s.get("archive"):
            _check_fragment(s["archive"], f"{where}archive/")
    _check_archive(d)


def _check_fragment(fragment: dict, where: str) -> None:
    path = fragment["file"]["path"]
    if not ARCHIVE_FILE.fullmatch(path):
        _fail(f"{where}file/path", f"{path!r} is not a data file of {ARCHIVE_DATA_DIR}/")
    try:
        meta = json.loads(fragment["lance"])
        named = [f["path"] for f in meta["files"]]
    except (ValueError, KeyError, TypeError, RecursionError):
        _fail(f"{where}lance", "is not a Lance fragment's metadata")
    if named != [path.rsplit("/", 1)[1]]:
        _fail(f"{where}lance", f"names data files {named}, not its own {path!r}")


def _check_archive(d: dict) -> None:
    archive = d.get("archive")
    if not archive:
        return
    if not ARCHIVE_MANIFEST.fullmatch(archive["manifest"]["path"]):
        _fail("archive/manifest/path", f"{archive['manifest']['path']!r} is not a version "
              f"manifest of {ARCHIVE_VERSIONS_DIR}/")
    keys = sum(s["num_keys"] for s in d["shards"] if s.get("archive"))
    if archive["rows"] != keys:
        _fail("archive/rows", f"{archive['rows']} rows, but the shards' fragments hold {keys} "
              "keys")
