"""Hostile and corrupted stores: the runtime reads only the store's own files, refuses what does
not add up with a StoreFormatError, and detects every flipped byte.

- symbolic links at every kind of path are refused, and nothing they point to is echoed;
- a manifest whose shard entry names another shard's files is refused;
- fuzzed manifests (Hypothesis, >= 1,000 examples) raise only StoreFormatError and never make
  ``load_store`` (or a search over what it loaded) open a file outside the store, which an audit
  hook watches;
- a single flipped byte in every file kind (CURRENT, manifest, transform, quantizer, document
  table, counts, token stream, inverted lists, the key archive's fragments and version manifest)
  is detected: the small files by every load, the large ones by ``load_store(verify="full")``
  and ``dresd verify``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dresd.cli import main as dresd_main
from dresd.store import load_store
from pipelines.build import build_store
from pipelines.config import BuildConfig
from schemas import StoreFormatError, read_manifest
from schemas.manifest import CURRENT_FILE, generation_path

FUZZ_EXAMPLES = 1000


@pytest.fixture(scope="module")
def store(tmp_path_factory, code_corpus_dir, tiny_llama_dir) -> Path:
    """A two-shard store with its key archive (kept by default: every file kind present)."""
    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in sorted(code_corpus_dir.glob("*.py"), key=lambda p: p.stat().st_size)[:4]:
        shutil.copy(f, corpus / f.name)
    config = BuildConfig(model=str(tiny_llama_dir), dim=8, sample_size=600, glob="*.py",
                         shard_tokens=1500, progress=False)
    manifest = build_store(corpus, root / "s", config)
    assert len(manifest.shards) >= 2 and all(s.archive is not None for s in manifest.shards)
    assert manifest.archive is not None and manifest.archive.rows == manifest.num_keys
    return root / "s"


def _copy(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    return dest


def _manifest_file(path: Path) -> Path:
    return generation_path(path, read_manifest(path).generation)


def _rewrite_manifest(path: Path, change) -> None:
    """Rewrite the current manifest with ``change(dict)`` applied, re-sealed (its sha256 field
    recomputed), so only the changed values can be what a reader refuses."""
    from schemas.manifest import _content_digest, _render

    f = _manifest_file(path)
    d = json.loads(f.read_text())
    change(d)
    d["sha256"] = _content_digest(d)
    f.write_bytes(_render(d))


# --------------------------------------------------------------------------- symlinks
def _file_kinds(path: Path) -> dict[str, str]:
    """One store-relative path of every file kind."""
    m = read_manifest(path)
    s = m.shards[0]
    return {"CURRENT": CURRENT_FILE, "manifest": f"manifests/{_manifest_file(path).name}",
            "transform": m.transform.file.path, "quantizer": m.index.quantizer.path,
            "tokens": s.tokens.path, "docs": s.docs.path, "counts": s.counts.path,
            "lists": s.index.path, "archive fragment": s.archive.file.path,
            "archive version": m.archive.manifest.path,
            "shard directory": f"shards/{s.shard_id}"}


@pytest.mark.parametrize("kind", ["CURRENT", "manifest", "transform", "quantizer", "tokens",
                                  "docs", "counts", "lists", "shard directory"])
def test_a_symlink_anywhere_in_the_store_is_refused(store, tmp_path, kind):
    path = _copy(store, tmp_path / "s")
    rel = _file_kinds(path)[kind]
    outside = tmp_path / "outside"
    shutil.move(path / rel, outside)  # same bytes, reached through a link
    os.symlink(outside, path / rel)
    with pytest.raises(StoreFormatError, match="symbolic link"):
        load_store(path, verify="full")


def test_a_linked_current_does_not_echo_its_target(store, tmp_path, capsys):
    path = _copy(store, tmp_path / "s")
    secret = tmp_path / "secret.txt"
    secret.write_text("api_key=TOP-SECRET-42\n")
    (path / CURRENT_FILE).unlink()
    os.symlink(secret, path / CURRENT_FILE)
    assert dresd_main(["info", str(path)]) != 0
    err = capsys.readouterr().err
    assert "symbolic link" in err and "TOP-SECRET" not in err


def test_a_shard_entry_naming_another_shards_files_is_refused(store, tmp_path):
    path = _copy(store, tmp_path / "s")

    def swap(d):  # shard 0's tokens entry (path and checksum) taken from shard 1: all valid
        d["shards"][0]["tokens"] = d["shards"][1]["tokens"]

    _rewrite_manifest(path, swap)
    with pytest.raises(StoreFormatError, match=r"shards/0/tokens/path.*not this shard's"):
        load_store(path)


def _set(path, value):
    def change(d):
        x = d
        for k in path[:-1]:
            x = x[k]
        x[path[-1]] = value if not callable(value) else value(d)

    return change


def _other_fragment(d):
    return d["shards"][1]["archive"]["file"]["path"]


@pytest.mark.parametrize(("change", "match"), [
    # a fragment's data file lies in archive.lance/data, and its Lance metadata names it
    pytest.param(_set(("shards", 0, "archive", "file", "path"), "CURRENT"),
                 r"shards/0/archive/file/path.*not a data file of archive.lance/data/",
                 id="fragment-outside-data"),
    pytest.param(_set(("shards", 0, "archive", "file", "path"), "archive.lance/data/a/b.lance"),
                 r"shards/0/archive/file/path.*not a data file", id="fragment-in-subdirectory"),
    pytest.param(_set(("shards", 0, "archive", "file", "path"), "archive.lance/../CURRENT"),
                 r"shards/0/archive/file/path", id="fragment-dot-dot"),
    pytest.param(_set(("shards", 0, "archive", "file", "path"), _other_fragment),
                 r"shards/0/archive/lance.*names data files .*not its own",
                 id="fragment-of-another-shard"),
    pytest.param(_set(("shards", 0, "archive", "lance"), "not json"),
                 r"shards/0/archive/lance.*not a Lance fragment's metadata",
                 id="fragment-metadata-not-json"),
    pytest.param(_set(("shards", 0, "archive", "lance"), "[" * 60000),
                 r"shards/0/archive/lance.*not a Lance fragment's metadata",
                 id="fragment-metadata-nested-too-deep"),
    pytest.param(_set(("shards", 0, "archive", "lance"), '{"files": [{"path": "x.lance"}]}'),
                 r"shards/0/archive/lance.*names data files \['x.lance'\]",
                 id="fragment-metadata-names-another-file"),
    # the archive's version manifest lies in archive.lance/_versions, its rows are the keys
    pytest.param(_set(("archive", "manifest", "path"), "manifests/gen-000001.json"),
                 r"archive/manifest/path.*not a version manifest of archive.lance/_versions/",
                 id="version-outside-versions"),
    pytest.param(_set(("archive", "rows"), lambda d: d["archive"]["rows"] + 1),
                 r"archive/rows", id="rows-not-the-keys"),
    pytest.param(_set(("shards", 0, "archive"), None), r"archive/rows",
                 id="a-shard-without-fragment"),
    pytest.param(_set(("archive", "path"), "elsewhere.lance"), r"archive", id="archive-path"),
    # a shard's lists: its own ivf.lists or a re-index's ivf-<16 hex>.lists
    pytest.param(_set(("shards", 0, "index", "path"), lambda d: d["shards"][1]["index"]["path"]),
                 r"shards/0/index/path.*not this shard's", id="lists-of-another-shard"),
    pytest.param(_set(("shards", 0, "index", "path"),
                      lambda d: f"shards/{d['shards'][0]['shard_id']}/ivf-XYZ.lists"),
                 r"shards/0/index/path.*ivf-<16 hex digits>.lists", id="lists-bad-name"),
    pytest.param(_set(("shards", 0, "index", "path"),
                      lambda d: f"shards/{d['shards'][0]['shard_id']}/counts.npy"),
                 r"shards/0/index/path", id="lists-another-file"),
])
def test_archive_and_lists_paths_are_checked(store, tmp_path, change, match):
    path = _copy(store, tmp_path / "s")
    _rewrite_manifest(path, change)
    with pytest.raises(StoreFormatError, match=match):
        load_store(path)
    assert dresd_main(["verify", str(path), "--force"]) != 0


def test_a_reindexed_lists_name_and_a_store_without_archive_load(store, tmp_path):
    """What the checks allow: lists named ``ivf-<16 hex>.lists``, no archive at all."""
    path = _copy(store, tmp_path / "s")
    m = read_manifest(path)
    s = m.shards[0]
    renamed = f"shards/{s.shard_id}/ivf-0123456789abcdef.lists"
    os.replace(path / s.index.path, path / renamed)

    def change(d):
        d["shards"][0]["index"]["path"] = renamed
        del d["archive"]
        for shard in d["shards"]:
            del shard["archive"]

    _rewrite_manifest(path, change)
    shutil.rmtree(path / "archive.lance")
    loaded = load_store(path, verify="full")
    assert loaded.manifest.archive is None and loaded.manifest.shards[0].index.path == renamed
    assert loaded.num_keys == m.num_keys


@pytest.mark.parametrize(("field", "value", "match"), [
    (("model", "eos_token_id"), 10**6, "eos_token_id.*outside the vocabulary"),
    (("model", "vocab_size"), 2**31, "vocab_size.*larger than"),
    (("value_len",), 2**53, "value_len.*larger than"),
    (("generation",), 7, "model|generation 7"),
    (("shards", 0, "num_docs"), 0, "num_keys"),
    (("dim",), 4, "transform|dim"),
    (("index", "nprobe"), 2**20, "nprobe.*larger than"),
])
def test_manifest_values_out_of_range_are_named(store, tmp_path, field, value, match):
    path = _copy(store, tmp_path / "s")

    def change(d):
        x = d
        for k in field[:-1]:
            x = x[k]
        x[field[-1]] = value

    _rewrite_manifest(path, change)
    with pytest.raises(StoreFormatError, match=match):
        load_store(path)


# --------------------------------------------------------------------------- fuzzing
class _OpenWatch:
    """An audit hook (they cannot be removed, so it is installed once and switched on and off)
    that records every file the watched call opens, with where it was opened from.

    Audit hooks run on the thread that opens, so the other threads of this process (a Dask
    client's event loop, say) are told apart by thread id. Code that is not the watched call
    can still run on its thread: the garbage collector's callbacks (``gc.callbacks``) and the
    finalizers of unreachable cycles run on whichever thread's allocation set a collection off.
    A dask scheduler living in this process hooks one there (``distributed.gc``'s GC
    diagnosis), which reads ``/proc/<pid>/statm`` through psutil at every full collection: the
    stray open this test once saw. Automatic collection is off while watching, so nothing but
    the watched call runs there, and every open of the call itself counts.
    """

    def __init__(self):
        self.thread: int | None = None
        self.opened: list[tuple[str, str]] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if (event == "open" and threading.get_ident() == self.thread
                and isinstance(args[0], (str, bytes, os.PathLike))):
            frame, where = sys._getframe(1), []
            while frame is not None and len(where) < 6:  # no source lines read here
                where.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                frame = frame.f_back
            self.opened.append((os.fsdecode(args[0]), " < ".join(where)))

    @contextlib.contextmanager
    def watching(self):
        """Record the opens of this thread in the block: ``[(path, where), ...]``."""
        self.opened.clear()
        collecting = gc.isenabled()
        gc.disable()
        self.thread = threading.get_ident()
        try:
            yield self.opened
        finally:
            self.thread = None
            if collecting:
                gc.enable()


_WATCH: _OpenWatch | None = None


def _watch() -> _OpenWatch:
    global _WATCH
    if _WATCH is None:
        _WATCH = _OpenWatch()
    return _WATCH


def _leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, (*path, i))
    yield path


def _values(paths: list[str]):
    """Replacement values: plausible ones (which pass the schema and test the range checks),
    hostile paths, and arbitrary JSON."""
    hostile = ["../outside.txt", "/etc/passwd", "shards/../../outside.txt", "CURRENT",
               "manifests/gen-000001.json", "shards", "", "."]
    return st.one_of(
        st.integers(min_value=-2, max_value=70_000),
        st.integers(min_value=-(2**63), max_value=2**63),
        st.sampled_from([0, 1, 2, 2**23, 2**31, 2**40, 2**53]),
        st.sampled_from(paths + hostile),
        st.text(max_size=12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.none(), st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


def _apply(d: dict, path: tuple, value, delete: bool) -> None:
    if not path:
        return
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value


def test_fuzzed_manifests_raise_only_store_format_errors_and_stay_inside(store, tmp_path_factory,
                                                                       monkeypatch):
    path = _copy(store, tmp_path_factory.mktemp("fuzz") / "s")
    cache = tmp_path_factory.mktemp("cache")  # where verification may be recorded, besides
    monkeypatch.setenv("DRESD_CACHE", str(cache))
    outside = path.parent / "outside.txt"
    outside.write_text("not the store's\n")
    f = _manifest_file(path)
    original = json.loads(f.read_text())
    leaves = [p for p in _leaves(original) if p]
    paths = sorted({str(x) for p in leaves for x in [_get(original, p)]
                    if isinstance(_get(original, p), str) and "/" in str(_get(original, p))})
    # the store, the verification records' cache, and code (a lazy import)
    allowed = (str(path.resolve()) + os.sep, str(cache.resolve()) + os.sep, sys.prefix,
               sys.base_prefix,
               str(Path(dresd_main.__code__.co_filename).resolve().parents[2]) + os.sep)
    watch = _watch()
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(leaves), _values(paths), st.booleans()),
                    min_size=1, max_size=3), st.booleans())
    def fuzz(changes, sealed):
        from schemas.manifest import _content_digest, _render

        d = json.loads(json.dumps(original))
        for p, value, delete in changes:
            try:
                _apply(d, p, value, delete and len(p) > 1)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier change removed or replaced the parent
        if sealed:  # re-sealed: the checks behind the checksum are what must hold
            d["sha256"] = _content_digest(d)
        try:
            f.write_bytes(_render(d))
        except (TypeError, ValueError):
            return  # not serializable as JSON (NaN is; a set is not): nothing to read
        with watch.watching() as opened:
            try:
                st_ = load_store(path, verify="auto")
                token = int(np.argmax(st_.shards[0].counts))
                q = np.ones(st_.manifest.dim, np.float32) / np.sqrt(st_.manifest.dim)
                st_.continuations(q, token, 10)
                outcomes["loaded"] += 1
            except StoreFormatError:
                outcomes["refused"] += 1
        stray = [(p, where) for p, where in opened
                 if not os.path.realpath(p).startswith(allowed)]
        assert not stray, f"opened outside the store: {stray}"

    fuzz()
    assert outcomes["refused"] > 0.5 * FUZZ_EXAMPLES  # the fuzzing reached the checks
    assert outcomes["loaded"] > 0  # ... and did not only break the JSON


def test_the_open_watch_records_only_the_watched_call(tmp_path):
    """Opens from another thread and from a garbage-collector callback (as distributed's GC
    diagnosis reads /proc/<pid>/statm) are not the watched call's; its own are all recorded."""
    outside, mine = tmp_path / "outside.txt", tmp_path / "mine.txt"
    outside.write_text("x")
    calls = []

    def reader(phase, info):
        calls.append(phase)
        open(outside).close()

    def make_cycles():
        for _ in range(200):
            x = []
            x.append(x)

    other = threading.Thread(target=lambda: open(outside).close())
    watch = _watch()
    threshold = gc.get_threshold()
    gc.callbacks.append(reader)
    gc.set_threshold(1)
    try:
        make_cycles()
        assert calls  # the callback runs on this thread's allocations when not watching ...
        with watch.watching() as opened:
            calls.clear()
            make_cycles()
            other.start()
            other.join()
            open(mine, "w").close()
            during = list(calls)
    finally:
        gc.callbacks.remove(reader)
        gc.set_threshold(*threshold)
    assert not during  # ... and not inside the watched block
    assert [p for p, _ in opened] == [str(mine)]
    assert __file__ in opened[0][1]  # where it was opened from


def _get(d, path):
    for k in path:
        d = d[k]
    return d


# --------------------------------------------------------------------------- corruption
SMALL = ["CURRENT", "manifest", "transform", "quantizer", "docs", "counts"]
LARGE = ["tokens", "lists"]  # checksummed by verify="full" and dresd verify
ARCHIVE = ["archive fragment", "archive version"]  # never opened by the runtime: checksummed
#                                                   by dresd verify


def _offsets(size: int, rng, edge: int = 32) -> list[int]:
    """Every byte of a small file; of a larger one the first and last ``edge`` bytes and as many
    random ones (headers, the ends and the body: a checksum does not care where, so a sample
    stands for every byte, and keeps this test to seconds)."""
    if size <= 4 * edge:
        return list(range(size))
    return sorted({*range(edge), *range(size - edge, size),
                   *rng.integers(0, size, 2 * edge).tolist()})


def _verify_says_corrupt(path, capsys) -> bool:
    code = dresd_main(["verify", str(path), "--force"])
    return code == 1 and "CORRUPT" in capsys.readouterr().err


@pytest.mark.parametrize("kind", SMALL + LARGE + ARCHIVE)
def test_every_single_byte_corruption_is_detected(store, tmp_path, kind, capsys):
    path = _copy(store, tmp_path / "s")
    rel = _file_kinds(path)[kind]
    target = path / rel
    good = target.read_bytes()
    rng = np.random.default_rng(0)
    missed = []
    for offset in _offsets(len(good), rng, edge=256 if kind == "manifest" else 32):
        bit = 1 << int(rng.integers(0, 8))
        bad = bytearray(good)
        bad[offset] ^= bit
        target.write_bytes(bytes(bad))
        if kind == "CURRENT":  # a hint: a flip is refused or still finds the newest commit
            try:
                if load_store(path).manifest.generation != read_manifest(store).generation:
                    missed.append(offset)
            except StoreFormatError:
                pass
            continue
        if kind == "manifest":  # read at every load, before anything it names
            try:
                read_manifest(path)
                missed.append(offset)
            except StoreFormatError:
                pass
            continue
        if kind in ARCHIVE:
            if not _verify_says_corrupt(path, capsys):
                missed.append(offset)
            continue
        try:
            load_store(path, verify="auto" if kind in SMALL else "full")
            missed.append(offset)
        except StoreFormatError:
            pass
        if kind in LARGE and offset % 8 == 0:  # the CLI says so too, with exit code 1
            assert _verify_says_corrupt(path, capsys)
    target.write_bytes(good)
    assert not missed, f"{len(missed)} flipped byte(s) of {rel} went undetected: {missed[:10]}"
    load_store(path, verify="full")  # restored: loads again
