import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_tiny_model, save_tiny_model, stdlib_files  # noqa: E402

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> saved tiny model directory (loadable with dresd.models.load_model)."""
    root = tmp_path_factory.mktemp("models")
    return {f: save_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    """(model, tokenizer) for each family, in memory."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def code_corpus_dir(tmp_path_factory) -> Path:
    """A small directory of real Python files (copied from the standard library)."""
    d = tmp_path_factory.mktemp("corpus")
    for p in stdlib_files(12):
        (d / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def dask_cluster():
    """A dask.distributed cluster: a scheduler and 2 workers of 1 thread each, every one in a
    process of its own, started for the session and stopped after it. Pipelines reach it with
    ``--runner=DaskRunner --dask_client_address=<cluster.scheduler_address>``.

    Not a LocalCluster: its scheduler runs inside this process, and a scheduler hooks
    ``gc.callbacks`` (``distributed.gc.enable_gc_diagnosis``) to read this process's RSS from
    ``/proc/<pid>/statm`` at every full collection, on whatever thread the collection happens
    (a test's own), and polls psutil from its system monitor. Here nothing of the cluster runs
    in the test process but the client side of the cluster object."""
    import gc
    import logging

    from distributed.deploy.subprocess import SubprocessCluster

    callbacks = list(gc.callbacks)
    # The scheduler and the workers import what the tasks name: the project, and the test
    # modules whose DoFns and functions pipelines here use. Workers start under a nanny, which
    # sets OMP_NUM_THREADS=1 (dask's default pre-spawn environment), so two workers' torch
    # threads do not fight over the machine's cores.
    here = Path(__file__).parent
    path = os.pathsep.join(p for p in (str(here), str(here.parent),
                                       os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", path)  # only while the processes start
        cluster = SubprocessCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                                    silence_logs=logging.ERROR)
    try:
        cluster.wait_for_workers(2, timeout=120)
        assert gc.callbacks == callbacks, "the cluster hooked this process's garbage collector"
        yield cluster
    finally:
        cluster.close()
