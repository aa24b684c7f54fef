"""Crash safety: an injected failure at every step of build, update, compact and publish leaves
a loadable store, and rerunning the command completes it with the counts of a clean run.
Also: the commit race, CURRENT as a strictly parsed hint, and `dresd gc`."""

import json
import multiprocessing
import os
import shutil
import time

import pytest

from dresd.archive import open_archive
from dresd.cli import main as dresd_main
from dresd.store import load_store
from pipelines import faults
from pipelines.build import build_store, compact_store, update_store
from pipelines.config import BuildConfig
from pipelines.gc import collect_garbage
from pipelines.journal import JOURNAL_DIR, RUN_FILE, recorded_shards, run_dirs
from pipelines.reindex import ReindexSettings, reindex_store
from schemas import StoreFormatError, list_generations, read_manifest
from schemas.archive import lance, version_of
from schemas.commit import CommitConflictError, commit_manifest, resolve_generation
from schemas.manifest import CURRENT_FILE

BUILD_POINTS = ["after_fit", "after_fragment_write", "after_shard_write", "after_index_fill",
                "after_shard_record", "before_archive_commit", "after_archive_commit",
                "before_manifest", "after_manifest", "after_current", "during_cleanup"]
UPDATE_POINTS = BUILD_POINTS[1:]
REINDEX_POINTS = ["after_reindex_train", "after_index_fill", "after_shard_record",
                  "before_manifest", "after_manifest", "after_current", "during_cleanup"]


def _config(model_dir, **kw):
    return BuildConfig(**{"model": str(model_dir), "dim": 8, "sample_size": 600, "glob": "*.py",
                          "shard_tokens": 1500, "progress": False, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, code_corpus_dir):
    root = tmp_path_factory.mktemp("fault-corpus")
    files = sorted(code_corpus_dir.glob("*.py"), key=lambda p: p.stat().st_size)[:5]
    first, later = root / "first", root / "later"
    first.mkdir()
    later.mkdir()
    for f in files[:3]:
        shutil.copy(f, first / f.name)
    for f in files[3:]:
        shutil.copy(f, later / f.name)
    return first, later


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus, tiny_llama_dir):
    """Clean runs: the store after build, after update, after compact (copies), and counts."""
    root = tmp_path_factory.mktemp("clean")
    config = _config(tiny_llama_dir)
    built = build_store(corpus[0], root / "s", config)
    shutil.copytree(root / "s", root / "built")
    updated = update_store(corpus[1], root / "s", config)
    shutil.copytree(root / "s", root / "updated")
    compacted = compact_store(root / "s", shard_tokens=10**9)
    return {"built": (root / "built", _counts(built)), "updated": (root / "updated",
            _counts(updated)), "compacted": _counts(compacted)}


def _counts(m):
    return (m.num_docs, m.num_tokens, m.num_keys)


@pytest.fixture
def fault(monkeypatch):
    def set_fault(spec):
        faults.reset()
        if spec:
            monkeypatch.setenv(faults.ENV, spec)
        else:
            monkeypatch.delenv(faults.ENV, raising=False)
    yield set_fault
    faults.reset()


def _fails(fn, *args, **kw):
    with pytest.raises(Exception) as info:  # noqa: B017 - Beam may wrap the injected fault
        fn(*args, **kw)
    assert "injected fault" in str(info.value)


def _loadable_generation(path) -> int:
    return load_store(path).manifest.generation


def _unreferenced_shards(path):
    named = {s.shard_id for g in list_generations(path) for s in read_manifest(path, g).shards}
    return sorted(p.name for p in (path / "shards").iterdir() if p.name not in named)


def _latest_archive_version(path) -> int:
    return lance().dataset(str(path / "archive.lance")).version


def _check_archive_after_gc(path):
    """Every generation's archive version and fragments are on disk, nothing else is: what a
    crashed run left (fragments, a version no manifest names) is gone, so the dataset's latest
    version is the live generation's."""
    manifests = [read_manifest(path, g) for g in list_generations(path)]
    live = manifests[-1]
    assert live.archive.rows == live.num_keys == open_archive(path).count_rows()
    named_files = {f.path.rsplit("/", 1)[1] for m in manifests for f in m.archive_files()
                   if "/data/" in f.path}
    assert {p.name for p in (path / "archive.lance" / "data").iterdir()} == named_files
    versions = {version_of(p.name) for p in (path / "archive.lance" / "_versions").iterdir()}
    assert versions - {None} == {m.archive.version for m in manifests}
    assert _latest_archive_version(path) == max(m.archive.version for m in manifests)


@pytest.mark.parametrize("point", BUILD_POINTS)
def test_build_crash_at_every_step_then_rerun(point, fault, corpus, tiny_llama_dir, clean,
                                              tmp_path):
    store = tmp_path / "s"
    fault(point)
    _fails(build_store, corpus[0], store, _config(tiny_llama_dir))
    committed = point in ("after_manifest", "after_current", "during_cleanup")
    if committed:
        assert _loadable_generation(store) == 1  # committed: loadable even without CURRENT
    else:
        with pytest.raises(StoreFormatError, match="not a dresd store"):
            load_store(store)
    recorded = [r["shard"].shard_id for d in run_dirs(store) for r in recorded_shards(store, d)]
    fault(None)
    manifest = build_store(corpus[0], store, _config(tiny_llama_dir))
    assert manifest.generation == 1 and list_generations(store) == [1]
    assert _counts(manifest) == clean["built"][1]
    assert _loadable_generation(store) == 1
    assert resolve_generation(store) == 1 and (store / CURRENT_FILE).is_file()
    if point == "after_shard_record":
        assert recorded and set(recorded) <= {s.shard_id for s in manifest.shards}  # reused
    assert not run_dirs(store)  # the rerun cleaned up its own journal
    collect_garbage(store, grace_s=0)
    assert not _unreferenced_shards(store)
    assert _counts(load_store(store).manifest) == clean["built"][1]
    _check_archive_after_gc(store)


@pytest.mark.parametrize("point", UPDATE_POINTS)
def test_update_crash_at_every_step_then_rerun(point, fault, corpus, tiny_llama_dir, clean,
                                               tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean["built"][0], store)
    fault(point)
    _fails(update_store, corpus[1], store, _config(tiny_llama_dir))
    committed = point in ("after_manifest", "after_current", "during_cleanup")
    assert _loadable_generation(store) == (2 if committed else 1)
    if point in ("after_archive_commit", "before_manifest"):
        # the crashed run's archive version exists, but no manifest names it: readers of the
        # store see generation 1's version
        assert _latest_archive_version(store) > read_manifest(store).archive.version == 1
        assert open_archive(store).version == 1
    recorded = [r["shard"].shard_id for d in run_dirs(store) for r in recorded_shards(store, d)]
    fault(None)
    manifest = update_store(corpus[1], store, _config(tiny_llama_dir))
    assert manifest.generation == 2 and list_generations(store) == [1, 2]
    assert _counts(manifest) == clean["updated"][1]
    if point == "after_shard_record":
        assert recorded and set(recorded) <= {s.shard_id for s in manifest.shards}  # reused
    collect_garbage(store, grace_s=0)
    assert not _unreferenced_shards(store) and not run_dirs(store)
    assert _counts(load_store(store).manifest) == clean["updated"][1]
    _check_archive_after_gc(store)


@pytest.mark.parametrize("point", UPDATE_POINTS)
def test_compact_crash_at_every_step_then_rerun(point, fault, clean, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean["updated"][0], store)
    fault(point)
    _fails(compact_store, store, shard_tokens=10**9)
    committed = point in ("after_manifest", "after_current", "during_cleanup")
    assert _loadable_generation(store) == (3 if committed else 2)
    fault(None)
    manifest = compact_store(store, shard_tokens=10**9)
    assert manifest.generation == 3 and len(manifest.shards) == 1
    assert _counts(manifest) == clean["compacted"] == clean["updated"][1]
    collect_garbage(store, grace_s=0)
    assert not _unreferenced_shards(store) and not run_dirs(store)
    assert _loadable_generation(store) == 3
    _check_archive_after_gc(store)


@pytest.mark.parametrize("point", REINDEX_POINTS)
def test_reindex_crash_at_every_step_then_rerun(point, fault, clean, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean["updated"][0], store)
    before = read_manifest(store)
    settings = ReindexSettings(nlist=7)
    fault(point)
    _fails(reindex_store, store, settings)
    committed = point in ("after_manifest", "after_current", "during_cleanup")
    assert _loadable_generation(store) == (3 if committed else 2)
    assert read_manifest(store, 2) == before  # the generation it re-indexes is untouched
    fault(None)
    manifest = reindex_store(store, settings)
    assert manifest.generation == 3 and manifest.index.nlist == 7
    assert manifest.archive == before.archive  # the same keys: the same archive version
    assert [s.shard_id for s in manifest.shards] == [s.shard_id for s in before.shards]
    assert all(s.index.path.rsplit("/", 1)[1].startswith("ivf-") for s in manifest.shards)
    assert _counts(manifest) == clean["updated"][1]
    collect_garbage(store, grace_s=0)
    assert not run_dirs(store)
    assert _counts(load_store(store).manifest) == clean["updated"][1]
    _check_archive_after_gc(store)


def test_gc_crash_leaves_a_loadable_store_and_a_rerun_finishes(fault, clean, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean["updated"][0], store)
    compact_store(store, shard_tokens=10**9)
    fault("during_gc")
    _fails(collect_garbage, store, keep=1, grace_s=0)
    assert _loadable_generation(store) == 3
    fault(None)
    report = collect_garbage(store, keep=1, grace_s=0)
    assert report.retained == [3] and list_generations(store) == [3]
    assert not _unreferenced_shards(store)
    assert _counts(load_store(store).manifest) == clean["compacted"]


def test_two_updates_from_the_same_generation(clean, corpus, tiny_llama_dir, tmp_path,
                                              monkeypatch):
    """The second update commits while the first is running: the first gets a clear error,
    nothing it had is lost, and its rerun adds its documents on top of the winner's."""
    import pipelines.build as build

    store = tmp_path / "s"
    shutil.copytree(clean["built"][0], store)
    other = tmp_path / "other"
    other.mkdir()
    (other / "extra.py").write_text("def extra(x):\n    return [x, x * 2, x * 3]\n" * 20)
    real = build.commit_generation
    calls = []

    def racing_commit(*args, **kw):
        if not calls:
            calls.append(1)
            winner = update_store(other, store, _config(tiny_llama_dir))  # commits generation 2
            assert winner.generation == 2
        return real(*args, **kw)

    monkeypatch.setattr(build, "commit_generation", racing_commit)
    with pytest.raises(CommitConflictError, match="generation 2 already exists.*rerun"):
        update_store(corpus[1], store, _config(tiny_llama_dir))
    assert _loadable_generation(store) == 2
    assert read_manifest(store).num_docs == clean["built"][1][0] + 1
    # the loser's archive version was discarded: the latest is the winner's
    assert _latest_archive_version(store) == read_manifest(store).archive.version
    monkeypatch.setattr(build, "commit_generation", real)
    final = update_store(corpus[1], store, _config(tiny_llama_dir))
    assert final.generation == 3 and final.num_docs == clean["updated"][1][0] + 1
    collect_garbage(store, grace_s=0)  # the loser's shards are garbage
    assert not _unreferenced_shards(store)
    assert load_store(store).manifest.num_docs == final.num_docs


def _race(args):
    store, data = args
    try:
        commit_manifest(store, 7, data)
        return "won"
    except CommitConflictError:
        return "lost"


def test_exactly_one_concurrent_committer_wins(tmp_path):
    (tmp_path / "manifests").mkdir()
    jobs = [(str(tmp_path), f'{{"writer": {i}}}'.encode()) for i in range(8)]
    with multiprocessing.get_context("fork").Pool(8) as pool:
        results = pool.map(_race, jobs)
    assert sorted(results) == ["lost"] * 7 + ["won"]
    winner = json.loads((tmp_path / "manifests" / "gen-000007.json").read_text())["writer"]
    assert results[winner] == "won"
    assert sorted(os.listdir(tmp_path / "manifests")) == ["gen-000007.json"]  # no temp files


def test_current_is_a_strict_hint(clean, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean["updated"][0], store)
    current = store / CURRENT_FILE
    good = current.read_bytes()
    assert good == b"manifests/gen-000002.json\n"
    current.write_bytes(b"manifests/gen-000001.json\n")  # behind: the commit is what counts
    assert resolve_generation(store) == 2
    current.unlink()  # absent: listing
    assert resolve_generation(store) == 2 and _loadable_generation(store) == 2
    current.write_bytes(b"")  # empty (a torn write): listing
    assert resolve_generation(store) == 2
    for bad in (b"manifests/gen-000001.jsol\n", b"x-000001", b"gen-1", b"manifests/gen-1.json",
                b"manifests/gen-000002.json", b"manifests/gen-000002.json\n\n",
                b" manifests/gen-000002.json\n", b"manifests/gen-000009.json\n",
                b"manifests/gen-000000.json\n", b"TOP-SECRET-TOKEN\n"):
        current.write_bytes(bad)
        with pytest.raises(StoreFormatError, match="CURRENT is corrupt") as info:
            resolve_generation(store)
        assert "SECRET" not in str(info.value)
    # every single-byte flip is refused or still resolves the newest committed generation
    for i in range(len(good)):
        for bit in range(8):
            flipped = bytearray(good)
            flipped[i] ^= 1 << bit
            current.write_bytes(bytes(flipped))
            try:
                assert resolve_generation(store) == 2
            except StoreFormatError as e:
                assert "corrupt" in str(e)


def test_non_utf8_manifest_is_named(clean, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean["built"][0], store)
    path = store / "manifests" / "gen-000001.json"
    path.write_bytes(b"\xff\xfe" + path.read_bytes())
    with pytest.raises(StoreFormatError, match="gen-000001.json is not UTF-8"):
        load_store(store)


def test_gc_keep_dry_run_grace_and_live_runs(clean, tmp_path, capsys):
    store = tmp_path / "s"
    shutil.copytree(clean["updated"][0], store)
    compact_store(store, shard_tokens=10**9)
    old_shards = {s.shard_id for s in read_manifest(store, 2).shards}
    stray = store / "shards" / ".s-0123456789abcdef.tmp-deadbeef"
    stray.mkdir()
    (stray / "tokens.arrow").write_bytes(b"x")
    (store / "index" / "ivf_flat-1-x.faiss.part").write_bytes(b"x")

    # young garbage is kept; a live run keeps unreferenced shards
    report = collect_garbage(store, keep=1, dry_run=True)
    assert report.kept_young >= 2 and "shards/" + next(iter(old_shards)) not in report.removed
    live = store / JOURNAL_DIR / "run-000003-k-1"
    live.mkdir(parents=True)
    (live / RUN_FILE).write_text("{}")
    report = collect_garbage(store, keep=1, dry_run=True, grace_s=0)
    assert report.live_runs == 1 and not any(p.startswith("shards/s-") for p in report.removed)
    shutil.rmtree(live)

    assert dresd_main(["gc", str(store), "--keep", "1", "--dry-run", "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "would remove manifests/gen-000001.json" in out and list_generations(store) == [1, 2, 3]
    assert all((store / "shards" / s).is_dir() for s in old_shards)
    assert dresd_main(["gc", str(store), "--keep", "1", "--grace", "0"]) == 0
    assert "removed" in capsys.readouterr().out
    assert list_generations(store) == [3] and not stray.exists()
    assert not any((store / "shards" / s).exists() for s in old_shards)
    assert not list((store / "index").glob("*.part"))
    assert _counts(load_store(store).manifest) == clean["compacted"]
    # the kept generation's files are intact and nothing else is left to remove
    assert collect_garbage(store, grace_s=0).removed == []
    assert dresd_main(["gc", str(store), "--keep", "0"]) == 2
    assert "--keep must be at least 1" in capsys.readouterr().err


def test_stale_heartbeat_is_dead(tmp_path):
    from pipelines.journal import LIVE_S, is_live

    run = f"{JOURNAL_DIR}/run-000001-k-1"
    d = tmp_path / run
    d.mkdir(parents=True)
    (d / RUN_FILE).write_text("{}")
    assert is_live(tmp_path, run)
    old = time.time() - LIVE_S - 1
    os.utime(d / RUN_FILE, (old, old))
    assert not is_live(tmp_path, run)


@pytest.mark.parametrize("point", ["after_shard_record", "after_manifest"])
def test_killed_build_then_rerun_from_the_cli(point, corpus, tiny_llama_dir, clean, tmp_path):
    """A real kill (os._exit: no handler runs, no journal 'ended' marker) at the step that used
    to leave a store stuck for good, and where a shard is recorded: the rerun completes."""
    import subprocess
    import sys

    store = tmp_path / "s"
    args = [sys.executable, "-m", "dresd.cli", "build", str(store), str(corpus[0]), "--model",
            str(tiny_llama_dir), "--dim", "8", "--sample-size", "600", "--glob", "*.py",
            "--shard-tokens", "1500", "--no-progress"]
    env = {**os.environ, faults.ENV: f"{point}:1:exit"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137
    if point == "after_manifest":
        assert not (store / CURRENT_FILE).exists() and _loadable_generation(store) == 1
    env.pop(faults.ENV)
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "generation 1:" in rerun.stdout
    if point == "after_shard_record":  # the killed run's launcher is gone: its shard is reused
        assert "reusing 1 shard(s)" in rerun.stderr
    assert _counts(load_store(store).manifest) == clean["built"][1]
    assert not run_dirs(store) and resolve_generation(store) == 1


def test_a_launcher_in_another_pid_namespace_is_left_to_its_heartbeat(tmp_path):
    """A pid is probed only where it means this machine's process: same host, boot and pid
    namespace. A run written by a container sharing the host name (another pid namespace), or
    by an older journal without the identity, stays live while its heartbeat is fresh."""
    import json

    from pipelines.journal import _process_identity, is_live

    gone_pid = 2**22 + 12345  # above the kernel's pid_max: no such process
    here = _process_identity()
    run = f"{JOURNAL_DIR}/run-000001-k-2"
    (tmp_path / run).mkdir(parents=True)
    for info, live in ((dict(here, pid=gone_pid), False),
                       (dict(here, pid=gone_pid, pidns=(here["pidns"] or 0) + 1), True),
                       ({"host": here["host"], "pid": gone_pid}, True)):
        (tmp_path / run / RUN_FILE).write_text(json.dumps(info))
        assert is_live(tmp_path, run) is live, info
