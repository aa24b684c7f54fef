"""Build, update and compact on Beam's DaskRunner (a LocalCluster of 2 worker processes) give
the store the DirectRunner gives; the encoder loads once per process for sampling and encoding."""

import shutil

import pytest

from pipelines import encoder
from pipelines.build import build_store, compact_store, update_store
from pipelines.config import BuildConfig
from pipelines.dead_letter import read_dead_letters
from pipelines.encoder import EncoderSpec
from schemas import read_manifest
from schemas.shard_io import read_docs


def _config(model_dir):
    # Small shards, so both runners write several and compaction has something to merge.
    return BuildConfig(model=str(model_dir), dim=8, sample_size=600, glob="*.py",
                       shard_tokens=4000, progress=False)


def _doc_ids(store, manifest) -> list[str]:
    return sorted(d for s in manifest.shards
                  for d in read_docs(store, s.shard_id).column("doc_id").to_pylist())


def _summary(store, manifest):
    letters = read_dead_letters(store, manifest.generation)
    return (manifest.generation, manifest.num_docs, manifest.num_tokens, manifest.num_keys,
            _doc_ids(store, manifest), sorted(d.reason for d in letters))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, code_corpus_dir):
    """4 code files and one non-UTF-8 file (a dead letter); 2 more files for the update."""
    root = tmp_path_factory.mktemp("dask-corpus")
    first, later = root / "first", root / "later"
    first.mkdir()
    later.mkdir()
    files = sorted(code_corpus_dir.glob("*.py"))
    for f in files[:4]:
        shutil.copy(f, first / f.name)
    for f in files[4:6]:
        shutil.copy(f, later / f.name)
    (first / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return first, later


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir):
    """A copy of the tiny model under a path of its own: its encoder tag is new to every
    process, so the load counters start from zero here."""
    d = tmp_path_factory.mktemp("dask-model") / "llama"
    shutil.copytree(tiny_llama_dir, d)
    return d


def _lifecycle(root, corpus, config, beam_args):
    """(build, update, compact) summaries of one store."""
    store = root / "s"
    out = [_summary(store, build_store(corpus[0], store, config, beam_args))]
    out.append(_summary(store, update_store([corpus[0], corpus[1]], store, config, beam_args)))
    out.append(_summary(store, compact_store(store, 1_000_000, beam_args)))
    return store, out


def test_dask_build_update_compact_match_the_direct_runner(tmp_path, corpus, model_dir,
                                                           dask_cluster):
    config = _config(model_dir)
    tag = EncoderSpec.of(config).tag
    before = encoder.LOADS[tag]
    _, direct = _lifecycle(tmp_path / "direct", corpus, config, None)
    # In-process runner: sampling, encoding and the update's encoding share one load.
    assert encoder.LOADS[tag] - before == 1

    dask_args = ["--runner=DaskRunner", f"--dask_client_address={dask_cluster.scheduler_address}"]
    store, dask = _lifecycle(tmp_path / "dask", corpus, config, dask_args)
    assert dask == direct
    assert direct[0][1] == 4 and direct[1][1] == 6
    assert len(direct[0][5]) == 1 and direct[0][5][0].startswith("not UTF-8")
    manifest = read_manifest(store)
    assert len(manifest.shards) == 1 and manifest.generation == 3

    # Every worker process loaded the model at most once over the build and the update, and
    # the workers did the encoding (the launcher's count did not move).
    from distributed import Client

    with Client(dask_cluster.scheduler_address) as client:
        loads = client.run(lambda: encoder.LOADS[tag])
    assert len(loads) == 2 and max(loads.values()) == 1, loads
    assert encoder.LOADS[tag] - before == 1


def test_dask_runner_reports_metrics(tmp_path, corpus, model_dir, dask_cluster):
    stats = {}
    dask_args = ["--runner=DaskRunner", f"--dask_client_address={dask_cluster.scheduler_address}"]
    manifest = build_store(corpus[1], tmp_path / "s", _config(model_dir), dask_args, stats)
    timing = stats["metrics"].encode
    assert timing is not None and timing.tokens == manifest.num_tokens
    assert timing.shards == len(manifest.shards)
