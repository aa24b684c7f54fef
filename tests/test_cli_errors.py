"""Bad input to the CLI: one clear line on stderr, a non-zero exit, and nothing written."""

import os
import shutil

import pytest
import torch

from dresd.cli import main
from pipelines.dead_letter import read_dead_letters


def _run(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # usage errors exit from argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line_error(capsys, *argv, match: str) -> str:
    rc, err = _run(capsys, *argv)
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


BUILD = ["--dim", "8", "--sample-size", "600", "--glob", "*.py", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, code_corpus_dir, tiny_llama_dir):
    """A small store built through the CLI from two code files and a file of NUL bytes."""
    corpus = tmp_path_factory.mktemp("cli-corpus")
    for f in sorted(code_corpus_dir.glob("*.py"), key=lambda p: p.stat().st_size)[:2]:
        shutil.copy(f, corpus / f.name)
    (corpus / "zeros.py").write_bytes(b"\0" * 4096)
    path = tmp_path_factory.mktemp("cli-store") / "s"
    assert main(["build", str(path), str(corpus), "--model", str(tiny_llama_dir), *BUILD]) == 0
    return path, corpus


def test_a_file_of_nul_bytes_is_a_dead_letter(store):
    path, _ = store
    letters = {d.source.rsplit("/", 1)[1]: d.reason for d in read_dead_letters(str(path), 1)}
    assert letters == {"zeros.py": "binary content: NUL byte at offset 0"}


def test_misspelled_option_is_an_error_and_beam_options_are_not(capsys, store, tiny_llama_dir,
                                                                tmp_path):
    _, corpus = store
    new = tmp_path / "new"
    _one_line_error(capsys, "build", new, corpus, "--model", tiny_llama_dir, "--dimm", "8",
                    match="unrecognized arguments: --dimm 8")
    assert not new.exists()
    _one_line_error(capsys, "compact", new, "--shard-tokenz", "5", match="--shard-tokenz")
    from dresd.cli import unknown_beam_options

    assert unknown_beam_options(["--runner=FnApiRunner", "--direct_num_workers=2",
                                 "--temp_location", "/tmp/x", "--project=p"]) == []
    assert unknown_beam_options(["--direct_num_workerz=2", "stray"]) == [
        "--direct_num_workerz=2", "stray"]


def test_prompt_longer_than_the_context(capsys, tiny_llama_dir):
    prompt = " ".join(str(i) for i in range(3000))
    err = _one_line_error(capsys, "generate", "--model", tiny_llama_dir, "--prompt", prompt,
                          "--budget", "fixed", match="the model's context is 2048 tokens")
    assert "the prompt is" in err


@pytest.mark.parametrize("flag,value,match", [
    ("--nprobe", "-1", "nprobe must be >= 0"),
    ("--temperature", "nan", "temperature must be 0 (greedy) or between 0.01"),
    ("--temperature", "1e-40", "temperature must be 0 (greedy) or between 0.01"),
    ("--temperature", "-1", "temperature must be 0"),
    ("--top-p", "nan", "top_p must be in (0, 1]"),
    ("--k", "0", "k must be >= 1"),
    ("--nprobe", "x", "invalid int value"),
])
def test_bad_numeric_options(capsys, tiny_llama_dir, flag, value, match):
    _one_line_error(capsys, "generate", "--model", tiny_llama_dir, "--prompt", "x", flag, value,
                    match=match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tiny_llama_dir, store, tmp_path):
    _one_line_error(capsys, "generate", "--model", tiny_llama_dir, "--prompt", "x", "--device",
                    "cuda", match="torch finds no CUDA device")
    _one_line_error(capsys, "calibrate", "--model", tiny_llama_dir, "--device", "cuda:0",
                    match="torch finds no CUDA device")
    _one_line_error(capsys, "generate", "--model", tiny_llama_dir, "--prompt", "x", "--device",
                    "gpu", match="unknown torch device 'gpu'")
    _one_line_error(capsys, "build", tmp_path / "new", store[1], "--model", tiny_llama_dir,
                    "--device", "cuda", *BUILD, match="torch finds no CUDA device")
    assert not (tmp_path / "new").exists()


def test_read_only_store_directory(capsys, store, tiny_llama_dir, tmp_path, monkeypatch):
    path, corpus = store
    ro = tmp_path / "ro"
    shutil.copytree(path, ro)
    before = sorted(p.relative_to(ro) for p in ro.rglob("*"))
    if os.geteuid() == 0:  # root writes anywhere: emulate a read-only mount for the store
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False
                            if str(p).startswith(str(ro)) and mode & os.W_OK else real(p, mode))
    os.chmod(ro, 0o555)
    try:
        _one_line_error(capsys, "update", ro, corpus, match=f"store directory {ro} is not "
                        "writable")
        _one_line_error(capsys, "compact", ro, "--shard-tokens", "1000000000",
                        match="is not writable")
        _one_line_error(capsys, "build", ro / "sub", corpus, "--model", tiny_llama_dir, *BUILD,
                        match=f"directory {ro} is not writable")
    finally:
        os.chmod(ro, 0o755)
    assert sorted(p.relative_to(ro) for p in ro.rglob("*")) == before


def test_non_utf8_manifest_names_the_file(capsys, store, tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store[0], bad)
    manifest = bad / "manifests" / "gen-000001.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"note"', b'"n\xffte"'))
    for argv in (["info", bad], ["generate", "--store", bad, "--model", tiny_llama_dir,
                                 "--prompt", "x"]):
        _one_line_error(capsys, *argv, match=f"manifest {manifest} is not UTF-8 text")


def test_corrupt_current_is_one_line_without_its_contents(capsys, store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store[0], bad)
    (bad / "CURRENT").write_text("password=hunter2\n")
    err = _one_line_error(capsys, "info", bad, match="CURRENT is corrupt")
    assert "hunter2" not in err


def test_device_files_and_pipes_as_input(capsys, store, tiny_llama_dir, tmp_path):
    new = tmp_path / "new"
    _one_line_error(capsys, "build", new, "/dev/zero", "--model", tiny_llama_dir, *BUILD,
                    match="corpus path /dev/zero is a character device, not a file or a "
                          "directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _one_line_error(capsys, "update", store[0], fifo, match=f"corpus path {fifo} is a named pipe")
    _one_line_error(capsys, "build", "/dev/null", store[1], "--model", tiny_llama_dir, *BUILD,
                    match="/dev/null is a character device, not a store directory")
    _one_line_error(capsys, "generate-corpus", tmp_path / "out.jsonl", "/dev/zero",
                    match="/dev/zero is a character device")
    _one_line_error(capsys, "gc", "/dev/null", match="no store at /dev/null")
    assert not new.exists() and not (tmp_path / "out.jsonl").exists()
