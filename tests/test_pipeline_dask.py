"""Build, update and compact on Beam's DaskRunner (a LocalCluster of 2 worker processes) give
the store the DirectRunner gives; the encoder loads once per process for sampling and encoding."""

import shutil

import apache_beam as beam
import pytest
from tiny_models import split_corpus

from pipelines import encoder
from pipelines.build import build_store, compact_store, update_store
from pipelines.config import BuildConfig
from pipelines.dead_letter import read_dead_letters
from pipelines.encoder import EncoderSpec
from pipelines.options import pipeline_options
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
    first, later = split_corpus(tmp_path_factory.mktemp("dask-corpus"), code_corpus_dir, 4, 2)
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


class _Split(beam.DoFn):
    def process(self, x):
        yield beam.pvalue.TaggedOutput("odd", x) if x % 2 else x


class _SumPerBundle(beam.DoFn):
    """Emits only from finish_bundle, as the encoder emits its last shard."""

    def start_bundle(self):
        self.total = 0

    def process(self, x):
        beam.metrics.Metrics.counter("probe", "seen").inc()
        self.total += x

    def finish_bundle(self):
        yield beam.transforms.window.GlobalWindows.windowed_value(self.total)


def _log(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def _write(path, name, values):
    _log(path, f"{name} {sorted(values)}")


def test_dask_runner_fixes(tmp_path, dask_cluster):
    """What Beam's DaskRunner gets wrong, right here (pipelines.dask_runner): every sink runs,
    tagged outputs stay apart, finish_bundle outputs arrive, a side input is computed once,
    metrics come back."""
    log = str(tmp_path / "log")
    p = beam.Pipeline(options=pipeline_options(
        ["--runner=DaskRunner", f"--dask_client_address={dask_cluster.scheduler_address}"]))
    nums = p | "Nums" >> beam.Create(list(range(10)))
    split = nums | "Split" >> beam.ParDo(_Split()).with_outputs("odd", main="even")
    for name, pc in (("even", split.even), ("odd", split.odd)):
        _ = (pc | f"Collect{name}" >> beam.combiners.ToList()
             | f"Write{name}" >> beam.Map(lambda v, n: _write(log, n, v), name))
    _ = (nums | "Bundles" >> beam.ParDo(_SumPerBundle()) | "SumAll" >> beam.CombineGlobally(sum)
         | "WriteSum" >> beam.Map(lambda v: _log(log, f"sum {v}")))
    side = (p | "One" >> beam.Create([100])
            | "Side" >> beam.Map(lambda x: (_log(log, "side computed"), x)[1]))
    _ = (nums | "AddSide" >> beam.Map(lambda x, s: x + s, beam.pvalue.AsSingleton(side))
         | "CollectAdded" >> beam.combiners.ToList()
         | "WriteAdded" >> beam.Map(lambda v: _write(log, "added", v)))
    result = p.run()
    result.wait_until_finish()
    lines = sorted(open(log).read().splitlines())
    assert lines == sorted([
        "even [0, 2, 4, 6, 8]", "odd [1, 3, 5, 7, 9]", "sum 45", "side computed",
        f"added {list(range(100, 110))}"])
    seen = result.metrics().query(beam.metrics.MetricsFilter().with_name("seen"))["counters"]
    assert sum(c.committed for c in seen) == 10


def _boom(x):
    raise ValueError(f"boom {x}")


def test_dask_runner_raises_a_worker_error_and_releases_its_dofns(dask_cluster):
    from distributed import Client

    from pipelines import dask_runner

    p = beam.Pipeline(options=pipeline_options(
        ["--runner=DaskRunner", f"--dask_client_address={dask_cluster.scheduler_address}"]))
    _ = p | beam.Create([1]) | beam.Map(_boom)
    result = p.run()
    with pytest.raises(ValueError, match="boom 1"):
        result.wait_until_finish()
    with Client(dask_cluster.scheduler_address) as client:
        idle = client.run(lambda: sum(len(v) for s in dask_runner._IDLE.values()
                                      for v in s.values()))
    assert set(idle.values()) == {0}  # every finished run's DoFns were torn down


def test_cli_knows_the_dask_options_of_the_short_runner_name():
    """``--runner=DaskRunner`` (no module path) still makes --dask_client_address known; in a
    fresh interpreter, where nothing imported Beam's dask runner yet."""
    import subprocess
    import sys

    code = ("from dresd.cli import unknown_beam_options as u; "
            "print(u(['--runner=DaskRunner', '--dask_client_address=tcp://h:1']), "
            "u(['--runner=DirectRunner', '--dask_client_adress=x']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[] ['--dask_client_adress=x']"
