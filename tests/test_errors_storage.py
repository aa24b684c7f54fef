"""Object storage that cannot be used, as users meet it: a wrong endpoint, no credentials, the
server gone mid-build. Each ends in one line on stderr naming the cause and what to do (exit
status 2), the traceback only with ``--debug``; the Python API raises the typed
``StorageError``. A real S3-API server (moto) on localhost, stopped and started by the tests."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dresd.cli import main as dresd_main
from schemas import read_manifest
from schemas.errors import StorageError
from schemas.storage import ObjectStoreIO, filesystem

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def no_server(monkeypatch):
    """Credentials, and an endpoint where nothing listens; botocore tries each request once."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DRESD_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("DRESD_DEBUG", raising=False)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert err[-1].startswith(f"dresd {command}: error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.mark.parametrize("argv", [
    ["info", "s3://bucket/store"],
    ["gc", "s3://bucket/store"],
    ["update", "s3://bucket/store", "corpus-dir"],
    ["generate", "--store", "s3://bucket/store", "--prompt", "x", "--max-new-tokens", "2"],
])
def test_an_unreachable_endpoint_is_one_line(argv, no_server, capsys, tmp_path, monkeypatch,
                                             tiny_llama_dir):
    monkeypatch.setenv("DRESD_CACHE", str(tmp_path / "cache"))
    if argv[0] == "update":
        argv = argv[:2] + [str(tmp_path)]
    if argv[0] == "generate":
        argv = argv + ["--model", str(tiny_llama_dir)]
    assert dresd_main(argv) == 2
    line = _one_error_line(capsys, argv[0])
    assert "cannot reach the object store at http://127.0.0.1:9" in line
    assert "DRESD_S3_ENDPOINT_URL" in line


def test_build_names_the_endpoint_not_a_missing_bucket(no_server, capsys, code_corpus_dir):
    assert dresd_main(["build", "s3://bucket/store", str(code_corpus_dir), "--glob",
                       "*.py"]) == 2
    line = _one_error_line(capsys, "build")
    assert "cannot reach the object store" in line and "bucket does not exist" not in line


def test_debug_shows_the_traceback(no_server, capsys):
    with pytest.raises(StorageError, match="cannot reach the object store"):
        dresd_main(["--debug", "info", "s3://bucket/store"])


def test_the_api_raises_the_typed_error(no_server):
    import dresd

    with pytest.raises(StorageError, match="cannot reach the object store"):
        read_manifest("s3://bucket/store")
    with pytest.raises(StorageError):
        dresd.load_store("s3://bucket/store")
    assert issubclass(StorageError, OSError)


def test_no_credentials_is_one_line(monkeypatch, capsys, tmp_path):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a client made with credentials
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("DRESD_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert dresd_main(["info", "s3://bucket/store"]) == 2
    line = _one_error_line(capsys, "info")
    assert "no credentials for s3://bucket/store" in line and "AWS_ACCESS_KEY_ID" in line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_dying_mid_build_is_one_line_and_the_rerun_completes(
        monkeypatch, tmp_path, tiny_llama_dir, code_corpus_dir):
    """The server stops while a build (a separate process) is working; the build ends with one
    line saying to rerun; the server comes back (its objects kept: moto's state lives in this
    process) and the same command completes, with the documents of a clean build."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {**CREDENTIALS, "DRESD_S3_ENDPOINT_URL": endpoint,
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DRESD_DEBUG", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs, _ = filesystem("s3://dying")
        fs.mkdir("dying")
        store = "s3://dying/store"
        argv = [sys.executable, "-m", "dresd.cli", "build", store, str(code_corpus_dir),
                "--glob", "*.py", "--model", str(tiny_llama_dir), "--dim", "8",
                "--sample-size", "600", "--shard-tokens", "1500", "--no-progress"]
        build = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        io = ObjectStoreIO(store)
        deadline = time.time() + 240
        while not io.listdir("shards") and build.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # the first shard is written: the encode is under way
        assert build.poll() is None, "the build ended before the server could be stopped"
        server.stop()
        _, err = build.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert build.returncode == 2, err
        assert not any("Traceback" in line for line in lines), err
        assert lines[-1].startswith("dresd build: error: cannot reach the object store"), err
        assert "rerun the same command" in lines[-1]
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port,
                                                verbose=False)
        server.start()
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        manifest = read_manifest(store)
        assert manifest.num_docs == len(list(code_corpus_dir.glob("*.py")))
    finally:
        server.stop()
