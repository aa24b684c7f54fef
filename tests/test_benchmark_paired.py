"""benchmarks/paired.py: the paired per-prompt log ratio the README's tables report."""

import json
import math

import pytest

from benchmarks.paired import main, paired, speeds


def _records():
    # method a is 2x, 1.5x and 0.8x method b's speed on prompts 0, 1 and 2
    out = []
    for prompt, ratio in enumerate((2.0, 1.5, 0.8)):
        out.append(dict(method="a", store="id", budget="calibrated", prompt=prompt, tokens=100,
                        seconds=1.0 / ratio))
        out.append(dict(method="b", store="", budget="", prompt=prompt, tokens=50, seconds=0.5))
    return out


def test_the_mean_and_standard_error_of_the_log_ratios():
    table = speeds(_records())
    assert set(table) == {"a/id/calibrated", "b"}
    mean, se, wins, n = paired(table["a/id/calibrated"], table["b"])
    logs = [math.log(2.0), math.log(1.5), math.log(0.8)]
    m = sum(logs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 2)
    assert mean == pytest.approx(m) and se == pytest.approx(sd / math.sqrt(3))
    assert (wins, n) == (2, 3)


def test_the_command_line(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(records=_records())))
    assert main([str(path), "a/id/calibrated", "b"]) == 0
    assert "faster on 2/3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(path), "a/id/calibrated", "c"])
    assert "has no method 'c'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a standard error needs 2"):
        paired({0: 1.0}, {0: 2.0})
