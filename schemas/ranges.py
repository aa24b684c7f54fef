"""Checks of a manifest's values against each other, after the JSON schema checked their types.

The schema (manifest.schema.json) can say that a field is an integer >= 1; it cannot say that the
end-of-sequence token lies inside the vocabulary, that the transform maps the model's hidden size
to the store's d, or that a shard's files are that shard's. A manifest that passes both is one
the runtime can open without reading outside its store or allocating from a corrupt number:

- every value a reader sizes memory or loops from is bounded (vocabulary, hidden size, d,
  value_len, nlist, token counts);
- values that describe one thing twice agree (d, the transform's dimensions, key counts);
- every file a shard entry names lies at ``shards/<shard_id>/<file name>``, so verifying the
  entries checks exactly the files loading reads; the transform lies under ``transform/`` and the
  quantizer under ``index/``.

Each violation is a ``StoreFormatError`` that names the field (as a path, like
``shards/3/num_keys``) and the values, never the file's contents beyond them.
"""

from __future__ import annotations

from schemas.errors import StoreFormatError
from schemas.layout import COUNTS_FILE, DOCS_FILE, INDEX_FILE, KEYS_FILE, TOKENS_FILE
from schemas.lists import MAX_POSITION, MAX_VOCAB

MAX_HIDDEN = 1 << 16  # hidden sizes of today's largest models are ~2^14
MAX_VALUE_LEN = 1024  # tokens sliced per value; drafts are a few dozen at most
MAX_NLIST = 1 << 24  # ~4 sqrt(N) lists: 2^24 would serve 10^13 keys
MAX_NPROBE = 1 << 16


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
    files = {"tokens": TOKENS_FILE, "docs": DOCS_FILE, "index": INDEX_FILE,
             "counts": COUNTS_FILE, "keys": KEYS_FILE}
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
