"""Build, update and compact on Beam's DaskRunner (a LocalCluster of 2 worker processes) give
the store the DirectRunner gives; the encoder loads once per process for sampling and encoding."""

import ast
import importlib
import importlib.metadata
import inspect
import re
import shutil
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------- Beam internals
# What pipelines.dask_runner takes from Beam beyond its public API, with the parameters it
# passes: positional ones in order, then "*" and the ones it passes by name (None: a class it
# only compares against, or a value). A parameter Beam renames, moves or adds without a
# default, and a name it removes, fails test_the_beam_internals_the_runner_uses_are_there.
BEAM_INTERNALS = {
    "apache_beam.runners.common._OutputHandler": (
        "*", "window_fn", "main_receivers", "tagged_receivers", "per_element_output_counter",
        "output_batch_converter", "process_yields_batches", "process_batch_yields_elements"),
    "apache_beam.runners.common.DoFnSignature": ("do_fn",),
    "apache_beam.runners.common.DoFnContext": ("label", "*", "state"),
    "apache_beam.runners.common.DoFnInvoker.create_invoker": (
        "signature", "output_handler", "*", "context", "side_inputs", "input_args",
        "input_kwargs", "user_state_context", "bundle_finalizer_param"),
    "apache_beam.runners.common.DoFnInvoker.invoke_setup": (),
    "apache_beam.runners.common.DoFnInvoker.invoke_start_bundle": (),
    "apache_beam.runners.common.DoFnInvoker.invoke_process": ("windowed_value",),
    "apache_beam.runners.common.DoFnInvoker.invoke_finish_bundle": (),
    "apache_beam.metrics.execution.MetricsContainer": ("step_name",),
    "apache_beam.metrics.execution.MetricsContainer.get_cumulative": (),
    "apache_beam.runners.worker.statesampler.StateSampler": ("prefix", "counter_factory"),
    "apache_beam.runners.worker.statesampler.StateSampler.start": (),
    "apache_beam.runners.worker.statesampler.StateSampler.stop": (),
    "apache_beam.runners.worker.statesampler.StateSampler.scoped_state": (
        "name_context", "state_name", "*", "metrics_container"),
    "apache_beam.utils.counters.CounterFactory": (),
    "apache_beam.transforms.sideinputs.SideInputMap": ("view_class", "view_options", "iterable"),
    "apache_beam.pvalue.AsSideInput._view_options": (),
    "apache_beam.transforms.core.Windowing.is_default": (),
    "apache_beam.runners.dask.transform_evaluator.OneReceiver": (),
    "apache_beam.runners.dask.transform_evaluator.get_windowed_value": ("item", "window_fn"),
    "apache_beam.runners.dask.transform_evaluator.defenestrate": ("x",),
    "apache_beam.runners.dask.transform_evaluator.Create": ("applied", "*", "bag_kwargs"),
    "apache_beam.runners.dask.transform_evaluator.Create.apply": ("*", "input_bag"),
    "apache_beam.runners.dask.transform_evaluator.Flatten": ("applied", "*", "bag_kwargs"),
    "apache_beam.runners.dask.transform_evaluator.Flatten.apply": ("*", "input_bag"),
    "apache_beam.runners.dask.transform_evaluator.GroupByKey": ("applied", "*", "bag_kwargs"),
    "apache_beam.runners.dask.transform_evaluator.GroupByKey.apply": ("*", "input_bag"),
    "apache_beam.runners.dask.overrides._Create": None,
    "apache_beam.runners.dask.overrides._Flatten": None,
    "apache_beam.runners.dask.overrides._GroupByKeyOnly": None,
    "apache_beam.runners.dask.overrides._Reshuffle": None,
    "apache_beam.runners.dask.overrides._GroupAlsoByWindow": None,
    "apache_beam.runners.dask.dask_runner.DaskRunner": None,
    "apache_beam.runners.dask.dask_runner.DaskOptions._extract_bag_kwargs": ("dask_options",),
    "apache_beam.runners.dask.dask_runner.dask_overrides": (),
    "apache_beam.runners.direct.direct_metrics.DirectMetrics": (),
    "apache_beam.runners.direct.direct_metrics.DirectMetrics.update_physical": (
        "bundle", "updates"),
    "apache_beam.runners.direct.direct_metrics.DirectMetrics.commit_logical": (
        "bundle", "updates"),
    "apache_beam.runners.direct.direct_metrics.DirectMetrics.query": ("filter",),
    "apache_beam.runners.runner.PipelineResult": ("state",),
    "apache_beam.runners.runner.PipelineState": None,
}
# Private attributes of Beam objects that exist only on instances (checked on real ones).
BEAM_INSTANCE_ATTRS = {"_window_mapping_fn", "_state"}
# Beam modules whose names are public API (not listed above).
BEAM_PUBLIC = {"apache_beam", "apache_beam.pvalue"}


def _resolve(dotted: str):
    """(owner, object) of a dotted name: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    owner = None
    for name in parts[i:]:
        owner, obj = obj, getattr(obj, name)
    return owner, obj


def _source_parameters(owner, obj) -> list[inspect.Parameter]:
    """The parameters of a compiled (Cython) class's ``__init__`` or method, from the
    pure-Python module Beam compiles it from and ships beside it."""
    cls, method = (obj, "__init__") if inspect.isclass(obj) else (owner, obj.__name__)
    module = sys.modules[cls.__module__]
    source = Path(module.__file__).with_name(module.__name__.rsplit(".", 1)[1] + ".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                and n.name == cls.__name__)
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    a = fn.args
    defaults = [inspect.Parameter.empty] * (len(a.args) - len(a.defaults)) + a.defaults
    out = [inspect.Parameter(x.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
           for x, d in zip(a.args, defaults)]
    out += [inspect.Parameter(x.arg, inspect.Parameter.KEYWORD_ONLY,
                              default=inspect.Parameter.empty if d is None else d)
            for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.vararg:
        out.append(inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    if a.kwarg:
        out.append(inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return out


def _parameters(owner, obj) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(obj).parameters.values())
    except ValueError:  # no signature: a compiled class or method
        params = _source_parameters(owner, obj)
    if params and params[0].name in ("self", "cls"):  # a method reached through its class
        params = params[1:]
    return params


def _signature_problems(dotted: str, spec: tuple) -> list[str]:
    owner, obj = _resolve(dotted)
    params = _parameters(owner, obj)
    by_name = {p.name: p for p in params}
    cut = spec.index("*") if "*" in spec else len(spec)
    positional, keywords = list(spec[:cut]), spec[cut + 1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    leading = [p.name for p in params if p.kind in kinds][:len(positional)]
    problems = []
    if leading != positional:
        problems.append(f"positional parameters {leading}, the runner passes {positional}")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    for k in keywords:
        if not takes_any and (k not in by_name
                              or by_name[k].kind is inspect.Parameter.POSITIONAL_ONLY):
            problems.append(f"no parameter {k!r} (the runner passes it by name)")
    passed = set(spec) - {"*"}
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                   inspect.Parameter.VAR_KEYWORD)]
    problems += [f"a required parameter {r!r} the runner does not pass" for r in required
                 if r not in passed]
    return [f"{dotted}: {p}" for p in problems]


def test_the_beam_internals_the_runner_uses_are_there():
    problems = []
    for dotted, spec in BEAM_INTERNALS.items():
        try:
            _resolve(dotted)
        except AttributeError as e:
            problems.append(f"{dotted}: {e}")
            continue
        if spec is not None:
            problems += _signature_problems(dotted, spec)
    assert not problems, "Beam changed what pipelines.dask_runner relies on:\n" + "\n".join(
        problems)


def test_the_private_beam_instance_attributes_the_runner_reads_are_there():
    from apache_beam.runners.dask import overrides
    from apache_beam.runners.runner import PipelineResult, PipelineState

    p = beam.Pipeline()
    nums = p | beam.Create([1])
    side = beam.pvalue.AsSingleton(nums)
    assert callable(side._window_mapping_fn) and isinstance(side._view_options(), dict)
    pardo = beam.ParDo(_Split(), side)
    assert pardo.raw_side_inputs == ((side,), {}) and isinstance(pardo.fn, _Split)
    assert overrides._GroupAlsoByWindow(nums.windowing).windowing.is_default()
    result = PipelineResult(PipelineState.RUNNING)
    result._state = PipelineState.DONE  # as the runner's result sets it
    assert result.state == PipelineState.DONE


def test_the_list_of_beam_internals_is_complete():
    """Every Beam name pipelines.dask_runner imports from a non-public module, every attribute
    it reaches through one, and every private attribute it reads of anything but itself is in
    BEAM_INTERNALS or BEAM_INSTANCE_ATTRS."""
    from pipelines import dask_runner

    tree = ast.parse(Path(dask_runner.__file__).read_text(encoding="utf-8"))
    listed = set(BEAM_INTERNALS) | BEAM_PUBLIC
    last = {d.rsplit(".", 1)[1] for d in BEAM_INTERNALS} | BEAM_INSTANCE_ATTRS

    def known(dotted):
        return any(k == dotted or k.startswith(dotted + ".") for k in listed)

    aliases, missing = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("apache_beam"):
            for a in node.names:
                dotted = f"{node.module}.{a.name}"
                if inspect.ismodule(_resolve(dotted)[1]):
                    aliases[a.asname or a.name] = dotted
                elif node.module not in BEAM_PUBLIC and not known(dotted):
                    missing.append(dotted)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("apache_beam"):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, x = [node.attr], node.value
        while isinstance(x, ast.Attribute):
            chain.insert(0, x.attr)
            x = x.value
        if node.attr.startswith("_") and not node.attr.startswith("__") and not (
                isinstance(node.value, ast.Name) and node.value.id == "self"):
            if node.attr not in last:
                missing.append(f"{ast.unparse(node)} (a private attribute)")
        if isinstance(x, ast.Name) and x.id in aliases and aliases[x.id] not in BEAM_PUBLIC:
            dotted = ".".join([aliases[x.id], *chain])
            if not known(dotted):
                missing.append(dotted)
    assert not missing, "not in BEAM_INTERNALS: " + ", ".join(sorted(set(missing)))


def test_another_beam_version_is_refused(monkeypatch):
    from pipelines import dask_runner

    args = ["--runner=DaskRunner", "--dask_client_address=tcp://127.0.0.1:1"]
    runner = dask_runner.DaskRunner()  # the installed Beam: accepted
    monkeypatch.setattr(beam.version, "__version__", "2.78.0")
    want = (rf"needs apache-beam=={re.escape(dask_runner.BEAM_VERSION)}, but 2\.78\.0 is "
            "installed")
    with pytest.raises(RuntimeError, match=want) as refused:
        beam.Pipeline(options=pipeline_options(args))  # the runner is made with the pipeline
    assert "\n" not in str(refused.value)
    with pytest.raises(RuntimeError, match=want):  # and checked again before connecting
        runner.run_pipeline(beam.Pipeline(), pipeline_options(args))


def test_beam_is_pinned_to_the_version_the_runner_was_written_for():
    from pipelines import dask_runner

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    pins = re.findall(r'"apache-beam(?:\[[^\]]*\])?([^"]*)"', pyproject)
    assert pins == [f"=={dask_runner.BEAM_VERSION}"]
    assert importlib.metadata.version("apache-beam") == dask_runner.BEAM_VERSION


@pytest.mark.parametrize(("make", "name", "label"), [
    (lambda p: p | "Start" >> beam.Impulse(), "apache_beam.transforms.core.Impulse", "Start"),
    (lambda p: (p | "Nums" >> beam.Create([1, 2])
                | "Window" >> beam.WindowInto(beam.transforms.window.FixedWindows(10))),
     "apache_beam.transforms.core.WindowInto", "Window"),
])
def test_a_transform_the_runner_does_not_translate_raises_with_its_name(dask_cluster, make,
                                                                        name, label):
    p = beam.Pipeline(options=pipeline_options(
        ["--runner=DaskRunner", f"--dask_client_address={dask_cluster.scheduler_address}"]))
    _ = make(p) | "Keep" >> beam.Map(lambda x: x)
    with pytest.raises(NotImplementedError,
                       match=rf"does not translate {re.escape(name)} \(step '{label}'\)"):
        p.run()
