"""Failures a user meets on a Dask cluster: workers that keep dying end the command in one line
that says to rerun (and the rerun completes), and relative paths given at the launcher mean
the same on the workers as on the DirectRunner. The session's real cluster (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from dresd.cli import main as dresd_main
from pipelines import faults
from pipelines.dask_runner import WorkersLostError
from schemas import read_manifest


def _dask(cluster) -> list[str]:
    return ["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]


def _set_worker_env(cluster, name: str, value: str | None) -> None:
    """Set (or, with None, unset) a variable in the workers and their nannies, so a worker the
    nanny starts again after a death has it too. Unsetting waits for every worker: one its
    nanny was starting again when the variable went would keep it, and die in the next test
    that writes a shard."""
    from distributed import Client

    def apply(name=name, value=value):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    with Client(cluster.scheduler_address) as client:
        client.run(apply, nanny=True)
        if value is not None:
            client.run(apply)
            return
        # A worker its nanny was starting again when the nanny's variable went may have it
        # still: wait until every worker is up, then unset it in each and check, until none
        # has it (the faults module reads the variable at each point, so that is enough).
        for _ in range(30):
            client.wait_for_workers(2, timeout=120)
            client.run(apply)
            if set(client.run(lambda: os.environ.get(name)).values()) == {None}:
                return
            time.sleep(1)
        raise AssertionError(f"{name} still set in a Dask worker")


def _build_args(store, corpus, model_dir) -> list[str]:
    return ["build", str(store), str(corpus), "--glob", "*.py", "--model", str(model_dir),
            "--dim", "8", "--sample-size", "600", "--shard-tokens", "4000", "--no-progress"]


def test_workers_that_keep_dying_end_in_one_line_and_the_rerun_completes(
        dask_cluster, code_corpus_dir, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DRESD_DEBUG", raising=False)
    store = tmp_path / "s"
    args = _build_args(store, code_corpus_dir, tiny_llama_dir) + _dask(dask_cluster)
    # Every worker process dies (as by kill -9) at its first shard write, the restarted ones too.
    _set_worker_env(dask_cluster, faults.ENV, "after_shard_write:1:exit")
    try:
        assert dresd_main(args) == 2
    finally:
        _set_worker_env(dask_cluster, faults.ENV, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    assert err[-1].startswith("dresd build: error: Dask workers kept dying"), err
    assert "rerun the same command" in err[-1]
    assert dresd_main(args) == 0
    assert read_manifest(store).num_docs == len(list(code_corpus_dir.glob("*.py")))


def test_the_api_raises_workers_lost_error(dask_cluster):
    import apache_beam as beam

    from pipelines.options import pipeline_options

    p = beam.Pipeline(options=pipeline_options(_dask(dask_cluster)))
    _ = p | beam.Create([1]) | beam.Map(_die)
    try:
        with pytest.raises(WorkersLostError, match="Dask workers kept dying"):
            p.run().wait_until_finish()
    finally:
        _set_worker_env(dask_cluster, faults.ENV, None)  # restarts the killed workers, waits
    assert issubclass(WorkersLostError, RuntimeError)


def _die(x):
    os._exit(137)


def test_relative_paths_mean_the_same_on_the_workers(dask_cluster, code_corpus_dir,
                                                       tiny_llama_dir, tmp_path, monkeypatch):
    """Corpus, model and store given relative to the launcher's working directory, which is
    not the workers': a build and an update on the cluster find them all."""
    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    files = sorted(code_corpus_dir.glob("*.py"))
    for f in files[:-1]:
        shutil.copy(f, work / "corpus" / f.name)
    (work / "later").mkdir()
    shutil.copy(files[-1], work / "later" / files[-1].name)
    model = os.path.relpath(tiny_llama_dir, work)
    monkeypatch.chdir(work)
    assert dresd_main(_build_args("s", "corpus", model) + _dask(dask_cluster)) == 0
    assert dresd_main(["update", "s", "later", "--glob", "*.py", "--model", model,
                       "--no-progress"] + _dask(dask_cluster)) == 0
    manifest = read_manifest(work / "s")
    assert manifest.generation == 2 and manifest.num_docs == len(files)


def _build_killing_one_worker(cluster, args: list[str], tmp_path, point: str) -> int:
    """Run ``dresd build`` on the cluster while one worker process (one only, across the
    cluster) dies as by kill -9 at the fault ``point``; its exit status. Fails if no worker
    died, since then nothing was tested."""
    from distributed import Client

    once = tmp_path / "fault-fired"
    with Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=120)
        before = set(client.scheduler_info()["workers"])
        _set_worker_env(cluster, faults.ONCE_ENV, str(once))
        _set_worker_env(cluster, faults.ENV, f"{point}:1:exit")
        try:
            rc = dresd_main(args + _dask(cluster))
        finally:
            _set_worker_env(cluster, faults.ENV, None)
            _set_worker_env(cluster, faults.ONCE_ENV, None)
        died = once.exists() and before - set(client.scheduler_info()["workers"])
    assert died, "no worker died: nothing was tested"
    return rc


def _assert_counts_equal(store, clean) -> None:
    want, got = read_manifest(clean), read_manifest(store)
    assert (got.num_docs, got.num_tokens, got.num_keys) == (want.num_docs, want.num_tokens,
                                                            want.num_keys)
    assert got.archive.rows == got.num_keys


def test_a_worker_killed_mid_encode_is_replaced_and_the_build_completes(
        dask_cluster, code_corpus_dir, tiny_llama_dir, tmp_path):
    """One worker process dies (as by kill -9) right after writing its first shard, before the
    shard reaches the fill: its nanny starts it again, the engine runs the lost work again, and
    the build completes with the counts of a clean build; the dead worker's shard and archive
    fragment are counted nowhere and are garbage for gc."""
    from pipelines.gc import collect_garbage

    clean = tmp_path / "clean"
    assert dresd_main(_build_args(clean, code_corpus_dir, tiny_llama_dir)) == 0
    store = tmp_path / "s"
    assert _build_killing_one_worker(dask_cluster, _build_args(store, code_corpus_dir,
                                                               tiny_llama_dir),
                                     tmp_path, "after_shard_write") == 0
    _assert_counts_equal(store, clean)
    got = read_manifest(store)
    named = {s.shard_id for s in got.shards}
    orphans = [p.name for p in (store / "shards").iterdir() if p.name not in named]
    assert orphans  # the killed worker's shard, written but never filled or committed
    collect_garbage(store, grace_s=0)
    assert {p.name for p in (store / "shards").iterdir()} == named
    fragments = {s.archive.file.path.rsplit("/", 1)[1] for s in got.shards}
    assert {p.name for p in (store / "archive.lance" / "data").iterdir()} == fragments


def test_a_worker_killed_mid_fill_commits_no_lists_of_another_quantizer(
        dask_cluster, code_corpus_dir, tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """One worker process dies right after filling a shard's lists, before the shard is
    recorded. The engine runs the lost work again, which may train the quantizer again (the
    trained one lived on the dead worker) and fill the remaining shards with the new one. The
    build completes, or stops with one line saying to rerun and the rerun completes; either
    way the counts are a clean build's, and every committed shard's lists are byte for byte
    what the committed quantizer writes from the shard's archive fragment."""
    from pipelines.fit import load_fitted
    from pipelines.index import fill_shard_index

    monkeypatch.delenv("DRESD_DEBUG", raising=False)
    clean = tmp_path / "clean"
    assert dresd_main(_build_args(clean, code_corpus_dir, tiny_llama_dir)) == 0
    store = tmp_path / "s"
    args = _build_args(store, code_corpus_dir, tiny_llama_dir)
    if _build_killing_one_worker(dask_cluster, args, tmp_path, "after_index_fill") != 0:
        err = capsys.readouterr().err.strip().splitlines()
        assert "rerun the same command" in err[-1], err
        assert dresd_main(args + _dask(dask_cluster)) == 0
    _assert_counts_equal(store, clean)
    manifest = read_manifest(store)
    quantizer = load_fitted(str(store), manifest).quantizer
    refill = tmp_path / "refill"
    shutil.copytree(store, refill)
    for info in manifest.shards:
        fill_shard_index(refill, info.shard_id, quantizer, manifest.model.vocab_size,
                         info.archive, "refilled.lists", counts=False)
        lists = f"shards/{info.shard_id}/"
        assert ((refill / lists / "refilled.lists").read_bytes()
                == (store / info.index.path).read_bytes()), info.shard_id
