"""A store's files are immutable (schemas/FORMAT.md, "Files are immutable"): what the runtime
promises when one is changed anyway.

- a file truncated under a process that has the store loaded: ``Store.check()`` in that process
  raises ``StoreFormatError`` naming the file, before anything reads the lost pages; a process
  that reads them instead dies with SIGBUS (documented: the OS delivers it, Python cannot catch
  it). Both run in a subprocess that loads the store while this process truncates the file;
- ``ivf.lists`` overwritten in place with zeros: ``load_store`` and ``Store.check()`` refuse its
  header, ``dresd verify`` exits 1 naming it, even after recording it verified, and even when
  the rewrite set the file's mtime back; with the header left intact, a load accepts it and the
  shard's keys are silently never found, and the checksum (``dresd verify``,
  ``verify="full"``) is what catches it;
- a file truncated before the load: ``StoreFormatError`` naming it, nothing crashes;
- no faiss thread reads the mapped lists in the background (its prefetch threads would die
  with SIGBUS on a truncated file at a moment no check can precede);
- a file removed or renamed over under a loaded store (``dresd gc`` dropping the generation it
  holds): ``check()`` passes and the store keeps reading the file it mapped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dresd.cli import main as dresd_main
from dresd.store import load_store
from schemas import StoreFormatError, read_manifest
from schemas.lists import read_lists_header

REPO = Path(__file__).resolve().parents[1]

# A reader process: loads the store, then runs one command per line of stdin, printing one
# line per command. "check": Store.check(); "read KIND SHARD": reads every mapped page of that
# shard file (a search probing every list, for the inverted lists).
READER = r"""
import sys
import numpy as np
from dresd.store import load_store
from schemas import StoreFormatError

store = load_store(sys.argv[1])
print("loaded", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "check":
        try:
            store.check()
            print("check passed", flush=True)
        except StoreFormatError as e:
            print("StoreFormatError:", e, flush=True)
        continue
    kind, s = cmd[1], int(cmd[2])
    shard = store.shards[s]
    if kind == "tokens":
        print("read", int(shard.tokens.astype(np.int64).sum()), flush=True)
    elif kind == "counts":
        print("read", int(shard.counts.astype(np.int64).sum()), flush=True)
    else:  # IndexIVF.search itself, not only the runtime's search_preassigned
        q = np.zeros((1, store.manifest.dim), np.float32)
        q[0, 0] = 1.0
        ivf = store.search.shards[s]
        ivf.nprobe = ivf.nlist
        _, ids = ivf.search(q, 8)
        print("read", int((ids >= 0).sum()), flush=True)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory, code_corpus_dir, tiny_llama_dir) -> Path:
    """A store of a few shards over the test corpus."""
    from pipelines.build import build_store
    from pipelines.config import BuildConfig

    root = tmp_path_factory.mktemp("immutable") / "s"
    manifest = build_store(code_corpus_dir, root, BuildConfig(
        model=str(tiny_llama_dir), dim=8, sample_size=600, glob="*.py", shard_tokens=20000,
        progress=False))
    assert 2 <= len(manifest.shards) <= 8
    return root


@pytest.fixture
def path(store, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(store, tmp_path / "s"))


def _ref(path: Path, kind: str, shard: int = 0):
    return getattr(read_manifest(path).shards[shard], kind)


def _zero(file: Path, start: int = 0) -> None:
    """Overwrite ``file`` with zeros from ``start`` to its end, in place (same inode, size)."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * (size - start))


class Reader:
    """A subprocess that has the store loaded (READER)."""

    def __init__(self, path: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO),
                                                        os.environ.get("PYTHONPATH")) if p)}
        env["PYTHONFAULTHANDLER"] = "1"  # a fatal signal prints every thread's stack first
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(path)], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.ask(None) == "loaded", self.finish()

    def ask(self, command: str | None) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def finish(self) -> tuple[int, str]:
        """Close its input and wait: (return code, stderr)."""
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


# --------------------------------------------------------------------- truncated while loaded
@pytest.mark.parametrize("kind", ["tokens", "counts", "index"])
def test_truncated_under_a_loaded_store_check_raises_and_a_read_dies_with_sigbus(path, kind):
    ref = _ref(path, kind)
    reader = Reader(path)
    try:
        assert reader.ask("check") == "check passed"
        assert reader.ask(f"read {kind} 0").startswith("read ")  # the mapping is readable
        os.truncate(path / ref.path, 0)
        # check() reads no mapped page: it names the file instead of crashing
        line = reader.ask("check")
        assert line.startswith("StoreFormatError:") and ref.path in line, (line, reader.finish())
        assert f"0 bytes, the manifest says {ref.bytes}" in line and "SIGBUS" in line
        # documented: reading the lost pages kills the process, no exception can catch it
        line = reader.ask(f"read {kind} 0")
        assert line == "", line
    finally:
        code, err = reader.finish()
    assert code == -signal.SIGBUS, (code, err)


def test_no_background_thread_reads_the_mapped_lists(path):
    """faiss maps ``ivf.lists`` as OnDiskInvertedLists, whose IndexIVF.search starts threads
    that read the probed lists' pages in the background and outlive the call: a page lost to a
    truncation would kill the process later, after a check() that passed. They are off."""
    import faiss

    store = load_store(path)
    for shard in store.search.shards:
        lists = faiss.downcast_InvertedLists(shard.invlists)
        assert getattr(lists, "prefetch_nthread", 0) == 0, type(lists).__name__


@pytest.mark.parametrize("kind", ["tokens", "docs", "counts", "index"])
def test_check_names_a_file_cut_short_under_a_loaded_store(path, kind):
    """Cut to half its length (not to 0): the size against the manifest, then the lists
    header, name the file; the process stays alive and exits normally."""
    ref = _ref(path, kind, shard=1)
    reader = Reader(path)
    try:
        os.truncate(path / ref.path, ref.bytes // 2)
        line = reader.ask("check")
    finally:
        code, err = reader.finish()
    assert line.startswith("StoreFormatError:") and ref.path in line, line
    assert f"{ref.bytes // 2} bytes, the manifest says {ref.bytes}" in line
    assert code == 0, err


# ---------------------------------------------------------------- ivf.lists zeroed in place
def test_zeroed_lists_are_refused_by_check_load_and_verify(path, capsys):
    ref = _ref(path, "index")
    assert dresd_main(["verify", str(path), "--no-progress"]) == 0  # recorded as verified
    capsys.readouterr()
    loaded = load_store(path)
    loaded.check()
    _zero(path / ref.path)
    assert (path / ref.path).stat().st_size == ref.bytes  # the size alone cannot tell
    with pytest.raises(StoreFormatError, match=f"{ref.path} is not an inverted-list file"):
        loaded.check()
    with pytest.raises(StoreFormatError, match=f"{ref.path} is not an inverted-list file"):
        load_store(path)
    with pytest.raises(StoreFormatError, match=f"{ref.path} is not an inverted-list file"):
        load_store(path, verify=False)
    # the verified record does not hide it: the write changed the file
    assert dresd_main(["verify", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {ref.path}:" in err and err.count("CORRUPT") == 1, err
    assert "checksum does not match" in err


def test_zeroed_lists_with_their_mtime_set_back_are_checksummed_again(path, capsys):
    ref = _ref(path, "index")
    file = path / ref.path
    assert dresd_main(["verify", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    st = file.stat()
    header = read_lists_header(file)
    _zero(file, header.data_offset)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` or `rsync --times`
    assert (file.stat().st_mtime_ns, file.stat().st_ino) == (st.st_mtime_ns, st.st_ino)
    assert dresd_main(["verify", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {ref.path}:" in err and err.count("CORRUPT") == 1, err


def _hits_per_shard(store, token: int) -> list[int]:
    """Keys followed by ``token`` that a search probing every list finds, per shard (k is the
    store's number of such keys, so no shard's hits push out another's)."""
    import faiss

    nlist = store.search.nlist
    quantizer = faiss.downcast_index(store.search.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):  # its beam must hold every list
        quantizer.hnsw.efSearch = max(int(quantizer.hnsw.efSearch), nlist)
    q = np.zeros(store.manifest.dim, np.float32)
    q[0] = 1.0
    k = store.search.group_size(token)
    shards, _, _ = store.search.search(q, token, k, nprobe=nlist)
    return np.bincount(shards, minlength=len(store.shards)).tolist()


def test_zeroed_list_body_loses_the_shards_keys_silently_until_verified(path, capsys):
    """Header intact, codes and ids zeroed (the documented gap): a load and check() accept it
    and a search silently finds none of the shard's keys; the checksum names the file."""
    ref = _ref(path, "index")
    before = load_store(path)
    counts = [np.asarray(s.counts) for s in before.shards]
    # a token with keys in shard 0 and in another shard (so the search has hits to return)
    token = max((t for t in np.flatnonzero(counts[0]) if t != 0 and any(
        c[t] for c in counts[1:])), key=lambda t: counts[0][t])
    found = _hits_per_shard(before, int(token))
    assert found == [int(c[token]) for c in counts] and found[0] > 0
    del before
    _zero(path / ref.path, read_lists_header(path / ref.path).data_offset)

    store = load_store(path)  # the header and the sizes are intact: nothing cheap sees it
    store.check()
    after = _hits_per_shard(store, int(token))
    assert after[0] == 0 and after[1:] == found[1:]
    with pytest.raises(StoreFormatError, match=f"{ref.path} is corrupt: its checksum"):
        load_store(path, verify="full")
    assert dresd_main(["verify", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {ref.path}:" in err and err.count("CORRUPT") == 1, err


# --------------------------------------------------------------------- truncated before load
@pytest.mark.parametrize("kind", ["tokens", "docs", "counts", "index"])
@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_file_truncated_before_the_load_is_named(path, kind, keep, capsys):
    ref = _ref(path, kind, shard=1)
    size = int(ref.bytes * keep)
    os.truncate(path / ref.path, size)
    for verify in (False, "auto", "full"):
        with pytest.raises(StoreFormatError,
                           match=f"{ref.path} is corrupt: {size} bytes, the manifest says "
                                 f"{ref.bytes}"):
            load_store(path, verify=verify)
    assert dresd_main(["verify", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {ref.path}:" in err and err.count("CORRUPT") == 1, err


@pytest.mark.parametrize("kind", ["tokens", "docs"])
def test_an_arrow_file_zeroed_in_place_is_a_store_format_error(path, kind):
    ref = _ref(path, kind)
    _zero(path / ref.path)
    with pytest.raises(StoreFormatError, match=f"{ref.path} is not a readable Arrow file"):
        load_store(path, verify=False)


# ------------------------------------------------------------- removed or replaced: not ours
def test_files_removed_or_replaced_after_the_load_are_not_the_mapped_ones(path):
    """What ``dresd gc`` does to a generation a process still holds (removes its shards), or a
    cache refresh by rename: the process keeps the files it mapped, and check() passes."""
    store = load_store(path)
    m = store.manifest
    tokens = [np.array(s.tokens) for s in store.shards]
    shutil.rmtree(path / f"shards/{m.shards[0].shard_id}")
    lists = path / m.shards[1].index.path
    replacement = lists.with_name("new")
    replacement.write_bytes(b"\0" * 10)
    os.replace(replacement, lists)  # another inode under the name
    store.check()
    assert all((np.asarray(s.tokens) == t).all() for s, t in zip(store.shards, tokens))
    assert _hits_per_shard(store, int(np.argmax(store.shards[1].counts)))[1] > 0
    # damage in place to a file the store opened is still found
    os.truncate(path / m.shards[1].counts.path, 1)
    with pytest.raises(StoreFormatError, match=f"{m.shards[1].counts.path} is corrupt: 1 bytes"):
        store.check()
