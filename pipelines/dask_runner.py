"""Beam's DaskRunner, with the fixes the builder's pipelines need.

Beam 2.77's ``apache_beam.runners.dask.dask_runner.DaskRunner`` translates a pipeline into Dask
bags, but as shipped it cannot run these pipelines correctly. What this runner changes, against
Beam's (defects 1-6 were seen on a ``dask.distributed`` cluster of 2 worker processes with a
10-element probe pipeline; tests/test_pipeline_dask.py checks 1-7):

1. Sinks. Beam computes only the bag of the last transform visited ("computing just the last
   value, which should be connected to the full Bag Task Graph"), so a pipeline with several
   sinks (the dead letters, the journal's fitted record, the run result) silently runs one of
   them. Here every PCollection nothing consumes is computed, all in one graph (a step several
   of them share runs once), and drained: nothing comes back to the client.
2. Multi-output ParDo. Beam keeps one bag per transform, so the consumer of every output of a
   ``with_outputs`` ParDo gets *all* its outputs, main and tagged (the dead letters would be
   tokenized, the documents written as dead letters). Here bags are kept per PCollection, each
   output filtered by its tag.
3. ``finish_bundle``. Beam takes a bundle's outputs before ``finish_bundle`` runs, dropping what
   it emits (the encoder's last shard of every bundle). Here they are read after it.
4. Side inputs. Beam hands a task the side input's bag, computed again, from the pipeline's
   start, inside every task that reads it (the probe's ran 10 times for 10 partitions: the
   transform would be fitted, and the whole corpus encoded again, for every partition of the
   encode and fill steps). Here a side input is one dask ``Delayed``, computed once and handed
   to every task that reads it.
5. Metrics. Beam's ``metrics()`` raises NotImplementedError and its DoFns run without a metrics
   container (``Metrics.counter(...).inc()`` goes nowhere). Here each bundle runs under a
   metrics container whose updates go to the scheduler's event log, from which ``metrics()``
   answers.
6. DoFn life cycle. Beam runs ``setup`` and ``teardown`` for every partition (a model load per
   partition). Here set-up DoFn instances wait in a per-process pool for later bundles of the
   same step, and are torn down on every worker when the run ends.
7. Transforms it does not translate. Beam runs any transform class missing from its
   ``TRANSLATIONS`` as an identity (``NoOp``): a root such as ``Read`` or ``Impulse`` yields
   nothing and a ``WindowInto`` does not window, silently. Here such a transform raises
   NotImplementedError naming its class and label; the only identities are a reshuffle and
   the window-grouping step of a GroupByKey in the default global windowing (the grouping
   before it already gave each key its one pane).
8. Partitions. Beam splits a Create into partitions of 128 elements, so a corpus of 100 files
   is one task, and a task holds all its partition's outputs at once. Here each element of a
   Create is its own partition (up to ``MAX_CREATE_PARTITIONS``) unless ``--dask_npartitions``
   or ``--dask_partition_size`` say otherwise: the builder's Creates hold units of work (a batch
   of files of about one shard, a shard), so a task's memory is one unit's, whatever the
   corpus size, and the scheduler balances units across workers.
9. The client. Beam's result leaves the Client it opened connected; it outlives the cluster and
   logs reconnection errors when the scheduler goes away. Here the result closes it when the
   run finishes, fails or is cancelled, and waits on that client only: waiting through the
   process's default client (``distributed.wait``) runs another event loop when the caller
   holds a Client of its own, and a future a lost worker sends back to pending then fails in
   ``result()`` with asyncio's "bound to a different event loop".

Create, GroupByKey and Flatten keep Beam's translations. Because this module reaches into
Beam's internals (``_OutputHandler``, ``DoFnInvoker``, ``StateSampler``, the dask runner's
``_Create``, ``_Flatten``, ``_Reshuffle``, ``_GroupAlsoByWindow``,
``DaskOptions._extract_bag_kwargs``, ``AsSideInput._view_options`` ...; the full list, with the
parameters it passes, is ``BEAM_INTERNALS`` in tests/test_pipeline_dask.py, which resolves each),
it refuses to run on any apache-beam but ``BEAM_VERSION`` (pinned in pyproject.toml). To move
to a newer Beam, run that test there, then the rest of tests/test_pipeline_dask.py; to drop this
module, check 1-9 against Beam's own runner.

Select it with ``--runner=DaskRunner`` (``pipelines.options`` maps the name here) and
``--dask_client_address=HOST:PORT``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
import threading
import time
import typing as t
import uuid

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import overrides as beam_overrides
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.runner import PipelineResult, PipelineState

# The one apache-beam whose internals this module was written and tested against.
BEAM_VERSION = "2.77.0"
METRICS_TOPIC = "dresd-beam-metrics"
MAX_CREATE_PARTITIONS = 4096  # past this, elements share partitions (see 8 above)


def check_beam_version() -> None:
    """Refuse any apache-beam but ``BEAM_VERSION`` (see the module docstring)."""
    installed = beam.version.__version__
    if installed != BEAM_VERSION:
        raise RuntimeError(
            f"pipelines.dask_runner needs apache-beam=={BEAM_VERSION}, but {installed} is "
            "installed: it relies on Beam internals that may have changed")

# Set-up DoFn instances of this process waiting for their next bundle, by run and step.
_IDLE: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
_IDLE_LOCK = threading.Lock()


def _take_dofn(run_id: str, step_id: str, fresh):
    """A set-up instance of the step's DoFn: an idle one of this process, else ``fresh``
    (just unpickled from the task), which the caller sets up."""
    with _IDLE_LOCK:
        idle = _IDLE[run_id][step_id]
        if idle:
            return idle.pop(), False
    return fresh, True


def _give_back(run_id: str, step_id: str, do_fn) -> None:
    with _IDLE_LOCK:
        _IDLE[run_id][step_id].append(do_fn)


def release_run(run_id: str) -> int:
    """Tear down and forget this process's idle DoFns of a finished run (run on every worker
    when the run ends, so a long-lived worker does not keep every past run's DoFns, and the
    models they hold, alive). The number torn down."""
    with _IDLE_LOCK:
        steps = _IDLE.pop(run_id, {})
    n = 0
    for fns in steps.values():
        for fn in fns:
            try:
                fn.teardown()
            except Exception:  # teardown is best effort in Beam too
                logging.getLogger(__name__).warning("teardown of %s failed", fn, exc_info=True)
            n += 1
    return n


def _report_metrics(run_id: str, updates) -> None:
    from distributed import get_worker

    if not (updates.counters or updates.distributions or updates.gauges):
        return
    try:
        worker = get_worker()
    except ValueError:  # not on a worker (a local compute): nothing to collect it
        return
    worker.log_event(METRICS_TOPIC, {"run": run_id, "updates": pickle.dumps(updates)})


def run_bundle(items, spec: _ParDoSpec, *side_values):
    """One Dask partition as one Beam bundle: (tag, value) pairs of every output."""
    from apache_beam.metrics.execution import MetricsContainer
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
    from apache_beam.runners.worker import statesampler
    from apache_beam.transforms.sideinputs import SideInputMap
    from apache_beam.utils.counters import CounterFactory

    do_fn, new = _take_dofn(spec.run_id, spec.step_id, spec.do_fn)
    receivers = te.OneReceiver()
    handler = _OutputHandler(
        window_fn=spec.window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
        per_element_output_counter=None, output_batch_converter=None,
        process_yields_batches=False, process_batch_yields_elements=False)
    sides = [SideInputMap(kind, options, [te.get_windowed_value(v, mapping) for v in values])
             for (kind, options, mapping), values in zip(spec.side_kinds, side_values)]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(do_fn), handler, context=DoFnContext(spec.label, state=None),
        side_inputs=sides, input_args=spec.args, input_kwargs=spec.kwargs,
        user_state_context=None, bundle_finalizer_param=beam.DoFn.BundleFinalizerParam())
    container = MetricsContainer(spec.label)
    sampler = statesampler.StateSampler(spec.label, CounterFactory())
    sampler.start()
    try:
        with sampler.scoped_state(spec.label, "process", metrics_container=container):
            if new:
                invoker.invoke_setup()
            invoker.invoke_start_bundle()
            for item in items:
                invoker.invoke_process(te.get_windowed_value(item, spec.window_fn))
            invoker.invoke_finish_bundle()  # before the outputs are read: its outputs count
    finally:
        sampler.stop()
    _give_back(spec.run_id, spec.step_id, do_fn)
    _report_metrics(spec.run_id, container.get_cumulative())
    out = []
    for v in receivers.values:
        if isinstance(v, beam.pvalue.TaggedOutput):
            out.append((v.tag, te.defenestrate(v.value)))
        else:
            out.append((None, te.defenestrate(v)))
    return out


@dataclasses.dataclass
class _ParDoSpec:
    """What a ParDo partition task needs (pickled once per task by Dask)."""

    step_id: str
    run_id: str
    label: str
    do_fn: t.Any
    window_fn: t.Any
    args: list
    kwargs: dict
    side_kinds: list  # (SideInput class, view options, window mapping fn) per side input


def _tag_is(tag):
    return lambda pair: pair[0] == tag


def _value(pair):
    return pair[1]


def _concat(parts):
    return [x for p in parts for x in p]


def _drain(partition):
    for _ in partition:
        pass
    return []


class _Visitor(beam.pipeline.PipelineVisitor):
    """Translates leaf transforms into bags, one per PCollection."""

    def __init__(self, bag_kwargs: dict, run_id: str):
        self.bag_kwargs = bag_kwargs
        self.run_id = run_id
        self.bags: dict[pvalue.PCollection, t.Any] = {}
        self.consumed: set[int] = set()
        self.sides: dict[int, t.Any] = {}

    def _side(self, pcoll):
        """The whole PCollection as one dask Delayed: computed once, shared by every task.

        Not as a bag ``Item``: dask turns an Item argument into a Delayed of its *optimized*
        graph, whose fused tasks are renamed copies of everything upstream, so each side input
        would run its producers again (seen as a DoFn processing every element 5 times).
        """
        if id(pcoll) not in self.sides:
            item = self.bags[pcoll].reduction(list, _concat)
            self.sides[id(pcoll)] = item.to_delayed(optimize_graph=False)
        return self.sides[id(pcoll)]

    def visit_transform(self, node) -> None:
        inputs = [pc for pc in node.inputs if not isinstance(pc, pvalue.PBegin)]
        self.consumed.update(id(pc) for pc in inputs)
        self.consumed.update(id(si.pvalue) for si in node.side_inputs)
        bags = [self.bags[pc] for pc in inputs]
        cls = node.transform.__class__  # exact classes: a subclass may mean something else
        if cls is beam.ParDo:
            self._pardo(node, bags[0])
            return
        if cls is beam_overrides._Create:
            out = self._create(node)
        elif cls is beam_overrides._Flatten:
            out = te.Flatten(node, bag_kwargs=self.bag_kwargs).apply(input_bag=bags)
        elif cls is beam_overrides._GroupByKeyOnly:
            out = te.GroupByKey(node, bag_kwargs=self.bag_kwargs).apply(input_bag=bags[0])
        elif cls is beam_overrides._Reshuffle or (
                cls is beam_overrides._GroupAlsoByWindow and node.transform.windowing.is_default()):
            out = bags[0]  # identities here (see 7 in the module docstring)
        else:
            raise NotImplementedError(
                f"the DaskRunner does not translate {cls.__module__}.{cls.__qualname__} (step "
                f"{node.full_label!r}); it runs Create, ParDo, GroupByKey, CoGroupByKey, "
                "Flatten, Reshuffle and combiners, in the global window")
        for pc in node.outputs.values():
            self.bags[pc] = out

    def _create(self, node):
        kwargs = dict(self.bag_kwargs)
        if not kwargs:
            n = len(node.transform.values)
            kwargs["npartitions"] = max(1, min(n, MAX_CREATE_PARTITIONS))
        return te.Create(node, bag_kwargs=kwargs).apply(input_bag=None)

    def _pardo(self, node, bag) -> None:
        transform = node.transform
        args, kwargs = transform.raw_side_inputs
        main = next(iter(node.main_inputs.values()))
        spec = _ParDoSpec(
            step_id=f"{node.full_label}-{uuid.uuid4().hex}", run_id=self.run_id,
            label=node.full_label, do_fn=transform.fn,
            window_fn=getattr(getattr(main, "windowing", None), "windowfn", None),
            args=list(args), kwargs=dict(kwargs),
            side_kinds=[(type(si), si._view_options(), si._window_mapping_fn)
                        for si in node.side_inputs])
        sides = [self._side(si.pvalue) for si in node.side_inputs]
        pairs = bag.map_partitions(run_bundle, spec, *sides, token=spec.step_id)
        outputs = node.outputs
        for tag, pc in outputs.items():
            mine = pairs if len(outputs) == 1 else pairs.filter(_tag_is(tag))
            self.bags[pc] = mine.map(_value)

    def leaves(self) -> list:
        """Bags of PCollections nothing consumes, drained (so nothing comes back)."""
        seen, out = set(), []
        for pc, bag in self.bags.items():
            if id(pc) in self.consumed or id(bag) in seen:
                continue
            seen.add(id(bag))
            out.append(bag.map_partitions(_drain))
        return out


class _Metrics:
    """Metrics of one run, from the scheduler's event log (attempted = committed)."""

    def __init__(self, client, run_id: str):
        from apache_beam.runners.direct.direct_metrics import DirectMetrics

        self._metrics = DirectMetrics()
        for _, msg in client.get_events(METRICS_TOPIC):
            if isinstance(msg, dict) and msg.get("run") == run_id:
                updates = pickle.loads(msg["updates"])
                self._metrics.update_physical(None, updates)
                self._metrics.commit_logical(None, updates)

    def query(self, filter=None):
        return self._metrics.query(filter)


class WorkersLostError(RuntimeError):
    """The Dask cluster lost the workers running a step more often than it retries a task
    (distributed's ``KilledWorker``), or the connection to its scheduler."""


def _lost(e: BaseException) -> WorkersLostError | None:
    """The one-line error a worker or scheduler loss stands for; None for any other error (a
    step's own exception, which Dask re-raises here as it was)."""
    import distributed

    if isinstance(e, distributed.KilledWorker):
        task = e.args[0] if e.args else "a task"
        return WorkersLostError(
            f"Dask workers kept dying while running {task} (the cluster gave up after "
            "distributed.scheduler.allowed-failures retries): check the workers' logs and "
            "memory; rerun the same command (a build or update reuses the shards it finished)")
    if type(e).__name__ in ("CommClosedError", "StreamClosedError") or isinstance(
            e, distributed.client.FutureCancelledError):
        return WorkersLostError(
            f"the connection to the Dask scheduler was lost ({type(e).__name__}); rerun the "
            "same command once the cluster is up (a build or update reuses the shards it "
            "finished)")
    return None


@dataclasses.dataclass
class DaskRunnerResult(PipelineResult):
    client: t.Any
    futures: list
    run_id: str

    def __post_init__(self):
        super().__init__(PipelineState.RUNNING)
        self._metrics = None

    def wait_until_finish(self, duration=None):
        if self._state in (PipelineState.DONE, PipelineState.FAILED):
            return self._state
        deadline = time.monotonic() + duration / 1000 if duration else None
        try:
            # Each future waits on the run's own client. distributed.wait would wait on the
            # process's default client: another event loop when the caller holds a Client of
            # its own, and a future that a lost worker sends back to pending then fails in
            # result() with asyncio's "bound to a different event loop".
            # Every leaf ends before any error is raised: the release of the run's DoFns
            # (in _close) must come after the last task returned its DoFns to the pool.
            for f in self.futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    f.exception(timeout=left)  # waits; a worker's exception is not raised yet
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        return self._state  # still running, as Beam's runners report it
                    raise
            for f in self.futures:
                f.result()  # raises a worker's exception here
            self._state = PipelineState.DONE
            self._metrics = _Metrics(self.client, self.run_id)
        except BaseException as e:
            self._state = PipelineState.FAILED
            lost = _lost(e)
            if lost is not None:
                raise lost from e
            raise
        finally:
            if self._state != PipelineState.RUNNING:
                self._close()
        return self._state

    def _close(self):
        try:
            self.client.run(release_run, self.run_id, on_error="ignore")
        except Exception as e:  # the scheduler gone: the workers' DoFns went with it
            logging.getLogger(__name__).info("could not release the run's DoFns on the "
                                             "workers (%s)", type(e).__name__)
        # The runner opened this client for the run; left open, it outlives the cluster and
        # logs reconnection errors when the scheduler goes away.
        self.client.close()

    def cancel(self):
        self.client.cancel(self.futures)
        self._close()
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self):
        if self._metrics is None:
            raise RuntimeError("metrics are read once the pipeline has finished")
        return self._metrics


class DaskRunner(beam_dask.DaskRunner):
    """Runs a pipeline on a Dask distributed cluster (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        check_beam_version()  # when the pipeline is created, before anything runs
        super().__init__(*args, **kwargs)

    def run_pipeline(self, pipeline, options):
        import distributed

        check_beam_version()

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client = distributed.Client(**dask_options)
        try:
            pipeline.replace_all(beam_dask.dask_overrides())
            run_id = uuid.uuid4().hex
            visitor = _Visitor(bag_kwargs, run_id)
            pipeline.visit(visitor)
            leaves = visitor.leaves()
            # Submitted together, the leaves form one graph: a step several leaves share runs
            # once.
            futures = client.compute(leaves) if leaves else []
        except BaseException:  # a transform it does not translate, say: nothing was submitted
            client.close()
            raise
        return DaskRunnerResult(client, futures, run_id)
