"""Corpus and store on object storage: a real S3-API server (moto in server mode) on localhost.

Build from an s3:// corpus into an s3:// store, update, compact, ``load_store`` and
``dresd generate`` from s3://, with counts equal to the same build on local paths; the
conditional put the commit rests on; two concurrent updates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid

import numpy as np
import pytest

from dresd.archive import open_archive
from dresd.cli import main as dresd_main
from pipelines.build import build_store, compact_store, update_store
from pipelines.config import BuildConfig
from schemas import StoreFormatError, read_manifest
from schemas.commit import CommitConflictError, commit_manifest, resolve_generation
from schemas.manifest import manifest_bytes
from schemas.storage import ObjectStoreIO, filesystem

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-API server on a free localhost port for the session, and the environment that
    points boto3 and s3fs at it (set here, undone after)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "DRESD_S3_ENDPOINT_URL": endpoint}.items():
        env.setenv(name, value)
    env.delenv("AWS_PROFILE", raising=False)
    yield endpoint
    env.undo()
    server.stop()


def _bucket(prefix: str = "dresd") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs, _ = filesystem(f"s3://{name}")
    fs.mkdir(name)
    return name


def _upload(local_dir, url: str) -> None:
    fs, path = filesystem(url)
    for f in sorted(local_dir.iterdir()):
        fs.put_file(str(f), f"{path}/{f.name}")


def _config(model_dir, **kw):
    return BuildConfig(**{"model": str(model_dir), "dim": 8, "sample_size": 800,
                          "glob": "*.py", "shard_tokens": 6_000, "progress": False, **kw})


def _counts(m):
    return (m.num_docs, m.num_tokens, m.num_keys)


def test_conditional_put_refuses_a_second_create(s3_endpoint):
    io = ObjectStoreIO(f"s3://{_bucket()}/store")
    io.create_exclusive("manifests/gen-000001.json", b"first")
    with pytest.raises(FileExistsError):
        io.create_exclusive("manifests/gen-000001.json", b"second")
    assert io.read("manifests/gen-000001.json") == b"first"
    with pytest.raises(CommitConflictError, match="generation 1 already exists"):
        commit_manifest(io.url, 1, b"third")
    io.replace("CURRENT", b"manifests/gen-000001.json\n")
    assert io.listdir("manifests") == ["gen-000001.json"] and io.exists("CURRENT")
    assert resolve_generation(io.url) == 1
    with pytest.raises(FileNotFoundError):
        io.read("missing")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, code_corpus_dir):
    """Small local corpora (first build, update, two concurrent updates) and their s3 copies."""
    root = tmp_path_factory.mktemp("s3corpus")
    files = sorted(code_corpus_dir.glob("*.py"))
    parts = {"first": files[:3], "later": files[3:5], "a": files[5:6], "b": files[6:7]}
    local = {}
    for name, fs in parts.items():
        d = root / name
        d.mkdir()
        for f in fs:
            text = f.read_text()[:6000]  # keep the encode short
            (d / f.name).write_text(text)
        local[name] = d
    return local


@pytest.fixture(scope="module")
def s3_and_local(s3_endpoint, corpora, tiny_llama_dir, tmp_path_factory):
    """The same build, update and compaction on s3:// and on local paths."""
    bucket = _bucket()
    corpus = f"s3://{bucket}/corpus"
    for name, d in corpora.items():
        _upload(d, f"{corpus}/{name}")
    store = f"s3://{bucket}/store"
    local = str(tmp_path_factory.mktemp("local") / "s")
    config = _config(tiny_llama_dir)
    out = {"store": store, "local": local, "corpus": corpus}
    out["built"] = (build_store(f"{corpus}/first", store, config),
                    build_store(corpora["first"], local, config))
    out["updated"] = (update_store(f"{corpus}/later", store, config),
                      update_store(corpora["later"], local, config))
    out["compacted"] = (compact_store(store, 100_000), compact_store(local, 100_000))
    return out


def test_build_update_compact_on_s3_match_local(s3_and_local, capsys):
    for step in ("built", "updated", "compacted"):
        remote, local = s3_and_local[step]
        assert _counts(remote) == _counts(local), step
        assert remote.generation == local.generation
    assert s3_and_local["built"][0].num_docs == 3
    assert s3_and_local["updated"][0].num_docs == 5
    assert len(s3_and_local["compacted"][0].shards) == 1
    store = s3_and_local["store"]
    io = ObjectStoreIO(store)
    assert resolve_generation(store) == 3 and read_manifest(store).generation == 3
    assert io.read("CURRENT") == b"manifests/gen-000003.json\n"
    assert io.listdir("journal") == []  # every run removed its journal
    manifests = [read_manifest(store, g) for g in (1, 2, 3)]
    named = {f.path for m in manifests for f in m.files()}
    stored = {p.split("/store/", 1)[1] for p in io.fs.find(io.path("shards"))}
    assert not any(p.endswith("keys.npy") for p in stored)  # keys go to the archive only
    # the key archive is kept (the default): every generation's fragments are data files of
    # archive.lance in the store, and the version each generation names is there
    fragments = {p.split("/store/", 1)[1] for p in io.fs.find(io.path("archive.lance/data"))}
    for m in manifests:
        assert m.archive is not None and m.archive.rows == m.num_keys
        assert all(s.archive is not None for s in m.shards)
        assert {s.archive.file.path for s in m.shards} <= fragments
        assert m.archive.manifest.path.startswith("archive.lance/_versions/")
        assert io.exists(m.archive.manifest.path)
        assert io.fs.size(io.path(m.archive.manifest.path)) == m.archive.manifest.bytes
    assert len({m.archive.version for m in manifests}) == 3
    assert all(p.startswith("archive.lance/data/") and p.endswith(".lance") for p in fragments)
    assert stored | fragments <= named  # no stray files (retried bundles' shards were removed)
    assert dresd_main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [g["generation"] for g in info["generations"]] == [1, 2, 3]
    assert info["keys"] == s3_and_local["compacted"][1].num_keys
    assert dresd_main(["verify", store]) == 2
    assert "checksummed as `load_store`" in capsys.readouterr().err
    # an update of documents the store already holds publishes nothing
    again = update_store(f"{s3_and_local['corpus']}/later", store,
                         _config(s3_and_local["built"][0].model.name))
    assert again.generation == 3


def test_load_store_from_s3_syncs_once_and_verifies(s3_and_local, tmp_path, monkeypatch):
    import dresd.remote as remote
    from dresd.store import load_store

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    store, local = s3_and_local["store"], s3_and_local["local"]
    fetched = []
    real = remote._download
    monkeypatch.setattr(remote, "_download", lambda io, ref, root: (fetched.append(ref.path),
                                                                     real(io, ref, root))[1])
    s = load_store(store)
    assert s.source == store and str(s.path).startswith(str(tmp_path / "cache" / "stores"))
    assert (s.manifest.generation, s.num_keys) == (3, load_store(local).num_keys)
    assert s.stats.unverified_bytes == 0  # every byte was checksummed on download
    # the serving set only: the key archive, which the runtime never opens, stays remote
    assert sorted(fetched) == sorted(f.path for f in s.manifest.serving_files())
    assert s.manifest.archive_files() and not any(p.startswith("archive.lance") for p in fetched)
    fetched.clear()
    again = load_store(store, verify="full")
    assert fetched == [] and again.manifest.generation == 3  # nothing downloaded twice
    # An older generation shares the mirror: only its own files come down.
    old = load_store(store, generation=1)
    assert old.manifest.generation == 1 and 0 < len(fetched) <= len(old.manifest.files())

    # The same URL rebuilt from scratch: generation 1 again, other files; the cache follows.
    rebuilt = f"s3://{_bucket()}/store"
    io_new = ObjectStoreIO(rebuilt)
    io_old = ObjectStoreIO(store)
    for rel in ("manifests/gen-000001.json", *(f.path for f in old.manifest.files())):
        io_new.replace(rel, io_old.read(rel))
    first = load_store(rebuilt, generation=1)
    assert first.manifest.generation == 1
    changed = dataclasses.replace(read_manifest(rebuilt, 1), note="rebuilt")
    io_new.replace("manifests/gen-000001.json", manifest_bytes(changed))
    assert load_store(rebuilt).manifest.note == "rebuilt"
    # A manifest changed in transit (its seal broken) is refused before anything is synced.
    io_new.replace("manifests/gen-000001.json",
                   manifest_bytes(changed).replace(b'"rebuilt"', b'"altered"'))
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache3"))
    with pytest.raises(StoreFormatError, match="does not match its sha256"):
        load_store(rebuilt)
    assert not (tmp_path / "cache3").exists()

    # A corrupt object is refused on download and nothing lands under its name.
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache2"))
    io = ObjectStoreIO(store)
    ref = s.manifest.shards[0].tokens
    good = io.read(ref.path)
    io.replace(ref.path, good[:-1] + bytes([good[-1] ^ 1]))
    try:
        with pytest.raises(StoreFormatError, match="checksum does not match"):
            load_store(store)
        assert not any((tmp_path / "cache2").rglob("tokens.arrow"))
    finally:
        io.replace(ref.path, good)


def test_dresd_generate_from_s3(s3_and_local, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    assert dresd_main(["generate", "--store", s3_and_local["store"], "--model",
                       str(tiny_llama_dir), "--prompt", "def parse(argv):\n    ",
                       "--max-new-tokens", "12", "--budget", "fixed", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "plain greedy: identical" in out and "5 docs" in out


def _concurrent_updates(store, corpora, names, config, rebase, monkeypatch):
    """Run one update per name in its own thread; both reach their commit point (having read
    the same parent generation) before either commits, so the race is real every time."""
    import pipelines.build as build

    results, start, at_commit = {}, threading.Barrier(len(names)), threading.Barrier(len(names))
    real, waited = build.commit_generation, set()

    def commit_after_both(*args, **kw):
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            at_commit.wait(timeout=120)
        return real(*args, **kw)

    monkeypatch.setattr(build, "commit_generation", commit_after_both)

    def run(name):
        start.wait()
        try:
            results[name] = update_store(corpora[name], store, config, rebase=rebase)
        except CommitConflictError as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(build, "commit_generation", real)
    return results


@pytest.mark.parametrize("rebase", [False, True], ids=["fail", "rebase"])
def test_two_concurrent_updates_on_s3(s3_endpoint, corpora, tiny_llama_dir, monkeypatch,
                                      rebase):
    """Two real update runs against one s3 store at once. Without --rebase one may lose the
    commit race: it fails with CommitConflictError, the winner's generation is intact, and a
    rerun adds its documents. With --rebase both land. Either way no document is lost."""
    bucket = _bucket()
    corpus = f"s3://{bucket}/corpus"
    for name in ("first", "a", "b"):
        _upload(corpora[name], f"{corpus}/{name}")
    store = f"s3://{bucket}/store"
    config = _config(tiny_llama_dir)
    base = build_store(f"{corpus}/first", store, config)
    s3 = {n: f"{corpus}/{n}" for n in ("a", "b")}
    results = _concurrent_updates(store, s3, ["a", "b"], config, rebase, monkeypatch)
    failed = [n for n, r in results.items() if isinstance(r, Exception)]
    assert len(failed) == (0 if rebase else 1), results
    if rebase:  # the loser of the race committed on top of the winner's generation
        assert sorted(m.generation for m in results.values()) == [2, 3]
        assert read_manifest(store, 3).parent_generation == 2
    for name in failed:
        assert "already exists" in str(results[name]) and "rerun" in str(results[name])
        assert update_store(s3[name], store, config).num_docs == base.num_docs + 2
        # the loser's shards and journal are garbage: gc on s3 removes them, nothing else
        from pipelines.gc import collect_garbage

        named = {s.shard_id for s in read_manifest(store).shards}
        io = ObjectStoreIO(store)
        assert set(io.listdir("shards")) > named and io.listdir("journal")
        report = collect_garbage(store, grace_s=0)
        assert report.removed and set(io.listdir("shards")) == named
        assert io.listdir("journal") == [] and resolve_generation(store) == 3
        removed = collect_garbage(store, keep=1, grace_s=0).removed
        # the old manifests first, then the archive versions only they named (and those
        # versions' Lance transactions): every shard and fragment is in generation 3
        assert removed[:2] == ["manifests/gen-000001.json", "manifests/gen-000002.json"]
        assert removed[2:] and all(p.startswith(("archive.lance/_versions/",
                                                 "archive.lance/_transactions/"))
                                   for p in removed[2:]), removed
        versions = [n for n in io.listdir("archive.lance/_versions") if n.endswith(".manifest")]
        assert versions == [read_manifest(store).archive.manifest.path.rsplit("/", 1)[1]]
        assert io.listdir("manifests") == ["gen-000003.json"]
    final = read_manifest(store)
    assert final.num_docs == base.num_docs + 2 and final.generation == 3
    assert {s.source.split("/corpus/")[1].split("/")[0] for s in _sources(store, final)} == {
        "first", "a", "b"}


def _sources(store, manifest):
    from types import SimpleNamespace

    from schemas.shard_io import read_docs
    from schemas.storage import staged

    out = []
    for s in manifest.shards:
        with staged(store, [s.docs.path]) as root:
            out += [SimpleNamespace(source=x) for x in
                    read_docs(root, s.shard_id).column("source").to_pylist()]
    return out




def test_local_corpus_into_an_s3_store(s3_endpoint, corpora, tiny_llama_dir, capsys):
    """Mixed locations: a local corpus into an s3 store; a second build, a missing bucket and
    an update of no store are clear errors."""
    store = f"s3://{_bucket()}/nested/store"
    m = build_store(corpora["a"], store, _config(tiny_llama_dir))
    assert m.num_docs == 1
    with pytest.raises(ValueError, match="already a store"):
        build_store(corpora["b"], store, _config(tiny_llama_dir))
    assert dresd_main(["update", store, str(corpora["b"]), "--glob", "*.py", "--no-progress",
                       "--rebase"]) == 0
    assert "generation 2: 2 shard(s), 2 documents" in capsys.readouterr().out
    with pytest.raises(ValueError, match="a store on gs:// is not supported yet"):
        build_store(corpora["b"], "gs://bucket/store", _config(tiny_llama_dir))
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        build_store(corpora["b"], "s3://no-such-bucket-here/store", _config(tiny_llama_dir))
    with pytest.raises(FileNotFoundError, match="no store at"):
        update_store(corpora["b"], f"s3://{_bucket()}/empty", _config(tiny_llama_dir))


def test_the_runtime_imports_no_builder_and_no_s3_client_until_needed():
    import subprocess
    import sys

    code = ("import sys, dresd, dresd.remote, dresd.store, dresd.commands.generate\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('pipelines', 'apache_beam', 's3fs', 'fsspec')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# after_current differs from after_manifest only in the hint, which test_store_faults covers.
@pytest.mark.parametrize("point", ["after_archive_commit", "before_manifest", "after_manifest"])
def test_a_crashed_update_on_s3_never_blocks_the_store(point, s3_endpoint, corpora,
                                                      tiny_llama_dir, tmp_path, monkeypatch):
    """A crash before the commit leaves the parent generation; a crash after it (CURRENT not
    moved yet) leaves the new one readable; a rerun completes either way."""
    from dresd.store import load_store
    from pipelines import faults

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    bucket = _bucket()
    store = f"s3://{bucket}/store"
    build_store(corpora["a"], store, _config(tiny_llama_dir))
    faults.reset()
    monkeypatch.setenv(faults.ENV, point)
    with pytest.raises(Exception, match="injected fault"):  # noqa: B017 - Beam may wrap it
        update_store(corpora["b"], store, _config(tiny_llama_dir))
    monkeypatch.delenv(faults.ENV)
    faults.reset()
    committed = point == "after_manifest"
    io = ObjectStoreIO(store)
    assert io.read("CURRENT") == b"manifests/gen-000001.json\n"  # the hint was not moved
    assert load_store(store).manifest.generation == (2 if committed else 1)
    assert open_archive(store).version == read_manifest(store).archive.version
    again = update_store(corpora["b"], store, _config(tiny_llama_dir))
    assert again.generation == 2 and again.num_docs == 2
    assert load_store(store).manifest.generation == 2
    from pipelines.gc import collect_garbage

    collect_garbage(store, grace_s=0)  # the crashed run's archive version, if any, goes
    versions = [n for n in io.listdir("archive.lance/_versions") if n.endswith(".manifest")]
    assert sorted(versions) == sorted(read_manifest(store, g).archive.manifest.path
                                      .rsplit("/", 1)[1] for g in (1, 2))
    assert open_archive(store).count_rows() == again.num_keys


# after_manifest takes the same path through the rerun as during_cleanup (a committed build).
@pytest.mark.parametrize("point", ["after_shard_record", "during_cleanup"])
def test_a_crashed_build_on_s3_is_completed_by_its_rerun(point, s3_endpoint, corpora,
                                                         tiny_llama_dir, monkeypatch, caplog):
    """The remote run journal: a rerun reuses the checksummed shards of the crashed run, or,
    when the crash came after the commit, finishes at once."""
    from pipelines import faults
    from pipelines.gc import collect_garbage

    store = f"s3://{_bucket()}/store"
    config = _config(tiny_llama_dir, shard_tokens=1500)
    faults.reset()
    monkeypatch.setenv(faults.ENV, point)
    with pytest.raises(Exception, match="injected fault"):  # noqa: B017 - Beam may wrap it
        build_store(corpora["first"], store, config)
    monkeypatch.delenv(faults.ENV)
    faults.reset()
    io = ObjectStoreIO(store)
    assert io.listdir("journal")  # the crashed run's journal is there to be adopted
    with caplog.at_level(logging.INFO):
        m = build_store(corpora["first"], store, config)
    if point == "after_shard_record":
        assert "reusing 1 shard(s)" in caplog.text
    else:
        assert "committed by an earlier run of this command" in caplog.text
    assert (m.generation, m.num_docs) == (1, 3) and io.listdir("journal") == []
    collect_garbage(store, grace_s=0)
    assert set(io.listdir("shards")) == {s.shard_id for s in m.shards}


def test_archive_on_s3_opens_in_lancedb_and_reindexes(s3_endpoint, corpora, tiny_llama_dir,
                                                     tmp_path, monkeypatch):
    """The archive Lance wrote to the bucket: LanceDB reads it there (a vector search with a
    next_token filter), and `dresd reindex` rebuilds the index from it into a new generation
    that loads from s3."""
    from dresd.store import load_store
    from pipelines.reindex import ReindexSettings, reindex_store

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    store = f"s3://{_bucket()}/store"
    current = build_store(corpora["first"], store, _config(tiny_llama_dir))
    table = open_archive(store)
    assert table.version == current.archive.version
    assert table.count_rows() == current.num_keys
    first = table.search().limit(1).to_arrow()
    query = np.asarray(first["key"][0].as_py(), np.float32)
    y = first["next_token"][0].as_py()
    hits = (table.search(query).metric("dot").where(f"next_token = {y}", prefilter=True)
            .limit(5).to_arrow())
    assert hits.num_rows >= 1 and set(hits["next_token"].to_pylist()) == {y}
    assert hits["_distance"][0].as_py() == pytest.approx(0.0, abs=2e-3)  # the key itself
    m = reindex_store(store, ReindexSettings(nlist=5, nprobe=5))
    assert m.generation == current.generation + 1 and m.index.nlist == 5
    assert m.archive == current.archive
    assert all(s.index.path.rsplit("/", 1)[1].startswith("ivf-") for s in m.shards)
    loaded = load_store(store)
    assert loaded.manifest.generation == m.generation and loaded.num_keys == current.num_keys
    s = loaded.search
    hit = s.search(query, y, 3)
    assert len(hit[1]) >= 1 and hit[2][0] == pytest.approx(1.0, abs=2e-2)


def test_staged_uploads_what_a_step_wrote_and_nothing_after_an_error(s3_endpoint, tmp_path):
    from schemas.storage import staged

    with staged(tmp_path) as root:  # a local store is worked on in place
        assert root == tmp_path
    io = ObjectStoreIO(f"s3://{_bucket()}/store")
    io.replace("shards/s-1/tokens.arrow", b"tokens")
    io.replace("shards/s-1/docs.arrow", b"docs")
    with staged(io.url, ["shards/s-1/tokens.arrow", "shards/s-1/docs.arrow"]) as root:
        assert (root / "shards/s-1/tokens.arrow").read_bytes() == b"tokens"
        (root / "shards/s-1/docs.arrow").unlink()  # removed there too
        (root / "shards/s-1/ivf.lists").write_bytes(b"lists")  # uploaded
        (root / "shards/s-1/.ivf.lists.part").write_bytes(b"x")  # scratch: not uploaded
    assert io.listdir("shards/s-1") == ["ivf.lists", "tokens.arrow"]
    with pytest.raises(RuntimeError, match="step failed"):
        with staged(io.url) as root:
            (root / "shards/s-2").mkdir(parents=True)
            (root / "shards/s-2/tokens.arrow").write_bytes(b"half")
            raise RuntimeError("step failed")
    assert io.listdir("shards") == ["s-1"]


def test_dask_workers_build_update_compact_on_s3(s3_and_local, corpora, tiny_llama_dir,
                                                 dask_cluster):
    """A real cluster's layout: Dask worker processes read the corpus from s3 and write their
    shards straight into the s3 store; the launcher commits. Counts equal the DirectRunner's
    build of the same corpus on local paths."""
    import os

    from distributed import Client

    # The cluster may have started before the S3 server: give its workers the same settings.
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "DRESD_S3_ENDPOINT_URL")}
    with Client(dask_cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=120)
        client.run(lambda: os.environ.update(env), nanny=True)  # a restarted worker too
        client.run(lambda: os.environ.update(env))
    args = ["--runner=DaskRunner", f"--dask_client_address={dask_cluster.scheduler_address}"]
    corpus = s3_and_local["corpus"]
    store = f"s3://{_bucket()}/store"
    config = _config(tiny_llama_dir)
    steps = {"built": build_store(f"{corpus}/first", store, config, args),
             "updated": update_store(f"{corpus}/later", store, config, args),
             "compacted": compact_store(store, 100_000, args)}
    for step, manifest in steps.items():
        assert _counts(manifest) == _counts(s3_and_local[step][1]), step
    assert ObjectStoreIO(store).listdir("journal") == []
