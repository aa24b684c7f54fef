"""The decode benchmark's result files: written after every prompt, each replaced atomically."""

import json

import pytest

from benchmarks import decode


def _records(prompts: int) -> list[dict]:
    out = []
    for i in range(prompts):
        out.append(dict(method="ar", store="", budget="", prompt=i, tokens=64, seconds=4.0,
                        identical=True, accepted_lengths=[]))
        out.append(dict(method="rest+pl", store="id", budget="calibrated", prompt=i, tokens=64,
                        seconds=2.0, identical=True, steps=32, step_tokens=63, accepted=31,
                        proposed=60, tree_tokens=200, retrieval_s=0.1, verify_s=1.8,
                        accepted_lengths=[2] * 31))
    return out


def test_results_are_rewritten_whole_and_a_failed_write_keeps_the_last(tmp_path, monkeypatch):
    out = tmp_path / "decode-cpu.json"
    meta = dict(machine="test CPU", dtype="float32", prompts=1, max_new_tokens=64, repeats=1)
    rows = decode.write_results(out, meta, _records(1))
    assert {r["method"]: r["speedup"] for r in rows} == {"ar": 1.0, "rest+pl": 2.0}
    saved = json.loads(out.read_text())
    assert saved["meta"]["prompts"] == 1 and len(saved["records"]) == 2
    assert "1 HumanEval prompts" in out.with_suffix(".txt").read_text()
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    def broken_plot(*args):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(decode, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        decode.write_results(out, {**meta, "prompts": 2}, _records(2))
    # the JSON was replaced whole before the plot failed; the plot and the tables are the last
    # complete ones, and no temporary file is left behind
    assert json.loads(out.read_text())["meta"]["prompts"] == 2
    assert out.with_suffix(".png").read_bytes() == png
    assert "1 HumanEval prompts" in out.with_suffix(".txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "decode-cpu.json", "decode-cpu.png", "decode-cpu.txt"]
