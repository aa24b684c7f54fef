"""The tree budget: fixed and device-calibrated policies, node selection, calibration files."""

import itertools

import numpy as np
import pytest

from dresd.budget import CalibratedBudget, FixedBudget, select_nodes
from dresd.calibrate import (
    DEFAULT_SIZES,
    VERSION,
    Calibration,
    calibration_path,
    load_or_measure,
)

# This CPU's SmolLM2-135M verify costs (DESIGN.md section 4), in seconds.
CPU = Calibration("fp", "cpu-test", 300, (1, 4, 16, 32, 64), (0.062, 0.104, 0.134, 0.159, 0.229))
# A GPU-like curve: flat up to 32 tokens.
GPU = Calibration("fp", "gpu-test", 300, (1, 32, 64), (0.010, 0.010, 0.016))
# Cost growing linearly, 30% of a one-token pass per extra token.
LINEAR = Calibration("fp", "linear", 300, (1, 64), (0.010, 0.010 * (1 + 0.3 * 63)))
# Not monotone: a CPU whose matmul kernel is slow for 2-3 rows (MKL on AMD EPYC, float32).
KERNELS = Calibration("fp", "cpu-kernels", 300, (1, 2, 3, 4, 16, 64),
                      (0.062, 0.110, 0.120, 0.080, 0.090, 0.200))


def random_trie(rng, n: int):
    """parents and path probabilities (each child at most its parent) of a random trie."""
    parents, probs = [-1], [1.0]
    for i in range(1, n):
        p = int(rng.integers(0, i))
        parents.append(p)
        probs.append(probs[p] * float(rng.uniform(0.05, 0.95)))
    return parents, probs


def closed_subsets(parents):
    """Every set of non-root nodes that contains each member's parent (the valid subtrees)."""
    n = len(parents)
    for mask in range(1 << (n - 1)):
        nodes = [i for i in range(1, n) if mask >> (i - 1) & 1]
        if all(parents[i] == 0 or parents[i] in nodes for i in nodes):
            yield nodes


@pytest.mark.parametrize("cal", [CPU, LINEAR, KERNELS], ids=["cpu", "linear", "kernels"])
def test_calibrated_budget_matches_brute_force(cal):
    rng = np.random.default_rng(0)
    policy = CalibratedBudget(cal, max_tree_tokens=64)
    sizes = set()
    for _ in range(30):
        parents, probs = random_trie(rng, 11)
        chosen = select_nodes(parents, probs, policy)
        got = policy.objective(len(chosen), sum(probs[i] for i in chosen))
        best = max(policy.objective(len(s), sum(probs[i] for i in s))
                   for s in closed_subsets(parents))
        assert got == pytest.approx(best, rel=1e-12)
        assert all(parents[i] == 0 or parents[i] in chosen for i in chosen)
        sizes.add(len(chosen))
    assert len(sizes) > 2  # the size really depends on the probabilities


def test_the_device_decides_the_size():
    # The same candidates: a chain accepted with probability 0.6 per token.
    parents = list(range(-1, 20))
    probs = [0.6**d for d in range(21)]
    cpu = select_nodes(parents, probs, CalibratedBudget(CPU))
    gpu = select_nodes(parents, probs, CalibratedBudget(GPU))
    assert 0 < len(cpu) < len(gpu) == 20
    # Hopeless drafts are not worth a wider pass on the CPU, and cost nothing on the GPU.
    weak = [1.0] + [0.02**d for d in range(1, 21)]
    assert select_nodes(parents, weak, CalibratedBudget(CPU)) == []
    # A fixed per-step overhead makes a longer pass relatively cheaper.
    slow = select_nodes(parents, probs, CalibratedBudget(CPU), overhead_s=0.5)
    assert len(slow) > len(cpu)


def test_the_budget_reads_a_non_decreasing_fit_of_the_measured_curve():
    # A dip measured at one size (noise, or a kernel change) would draw every tree to that
    # size; the fit pools it with its neighbours and rises through the pooled sizes.
    noisy = Calibration("fp", "noisy", 300, (1, 2, 3, 4, 5, 6),
                        (0.050, 0.080, 0.090, 0.060, 0.085, 0.100))
    fit = noisy.fitted()
    assert np.all(np.diff(fit) >= 0) and fit[0] == 0.050 and fit[-1] == 0.100
    # 2-4 tokens pooled (mean 0.0767, placed at 3) and interpolated: rising through them
    assert fit[1] < fit[2] < 0.080 < fit[3] < fit[4] == 0.085
    assert noisy.cost(4) == fit[3] and noisy.seconds[3] == 0.060  # the raw medians are kept
    # a non-decreasing curve is its own fit, flat parts included
    for cal in (CPU, GPU, LINEAR):
        assert np.allclose(cal.fitted(), cal.seconds)
    # with the raw points the policy would go for the dip at 4 tokens; with the fit it does not
    parents = list(range(-1, 10))
    probs = [1.0, 0.9] + [0.9 * 0.05**d for d in range(1, 10)]
    raw = CalibratedBudget(noisy)
    raw_rate = [(1 + sum(probs[1:n + 1])) / noisy.seconds[n] for n in range(6)]
    assert int(np.argmax(raw_rate)) == 3
    assert len(select_nodes(parents, probs, raw)) == 1
    # KERNELS: slow 2-3 rows are averaged into the fit
    assert np.all(np.diff(KERNELS.fitted()) >= 0)


def test_fixed_budget_and_the_limits():
    rng = np.random.default_rng(1)
    parents, probs = random_trie(rng, 60)
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    assert len(select_nodes(parents, probs, FixedBudget(100))) == 59
    chosen = select_nodes(parents, probs, FixedBudget(16))
    assert len(chosen) == 15
    # best first: the 15 likeliest nodes (the set is closed since children are less likely)
    assert sorted(probs[i] for i in chosen) == sorted(probs[1:], reverse=True)[:15][::-1]
    for leaves, max_depth in itertools.product([1, 2, 3], [1, 2, 4]):
        chosen = select_nodes(parents, probs, FixedBudget(64), max_leaves=leaves,
                              max_depth=max_depth)
        assert chosen
        inner = {parents[i] for i in chosen}
        assert sum(1 for i in chosen if i not in inner) <= leaves
        assert max(depth[i] for i in chosen) <= max_depth
        assert all(parents[i] == 0 or parents[i] in chosen for i in chosen)
    with pytest.raises(ValueError, match="parents must precede"):
        select_nodes([-1, 2, 0], [1, 0.5, 0.5], FixedBudget())
    with pytest.raises(ValueError, match="max_tree_tokens"):
        FixedBudget(0)


def test_calibration_file_round_trips(tmp_path):
    path = CPU.save(tmp_path / "c" / "cal.json")
    again = Calibration.load(path)
    assert again == CPU
    assert again.cost(8) == pytest.approx(0.104 + (0.134 - 0.104) * 4 / 12)
    assert again.relative_cost(64) == pytest.approx(0.229 / 0.062)


def test_load_or_measure_saves_per_model_and_device(tiny_llama_dir, tmp_path, monkeypatch):
    from dresd.models import load_model, model_fingerprint

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    model, tok = load_model(tiny_llama_dir)
    fp = model_fingerprint(model, tok)
    kw = dict(sizes=(1, 4, 16), past_len=32, repeats=2)
    cal = load_or_measure(model, fp, **kw)
    path = calibration_path(fp, model.device)
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert cal.model_fingerprint == fp and cal.sizes == (1, 4, 16)
    assert all(s > 0 for s in cal.seconds)
    # reused, not measured again (a measurement would not reproduce the same timings)
    assert load_or_measure(model, fp, **kw) == cal
    fresh = load_or_measure(model, fp, refresh=True, **kw)
    assert Calibration.load(path) == fresh


def test_a_bfloat16_model_keeps_its_own_calibration(tiny_llama_dir, tmp_path, monkeypatch):
    import torch

    from dresd.models import load_model, model_fingerprint

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    kw = dict(sizes=(1, 4), past_len=32, repeats=1, progress=False)
    f32, tok = load_model(tiny_llama_dir)
    bf16, _ = load_model(tiny_llama_dir, dtype="bfloat16")
    fp = model_fingerprint(f32, tok)
    assert model_fingerprint(bf16, tok) == fp  # the same weights, so the same store key
    cal32 = load_or_measure(f32, fp, **kw)
    cal16 = load_or_measure(bf16, fp, **kw)
    names = sorted(p.name for p in (tmp_path / "calibration").iterdir())
    assert names == sorted([calibration_path(fp, f32.device).name,
                            calibration_path(fp, f32.device, torch.bfloat16).name])
    assert any(n.endswith("-bfloat16.json") for n in names)
    # each is reused from its own file (a new measurement would not reproduce the timings)
    assert load_or_measure(bf16, fp, **kw) == cal16 and load_or_measure(f32, fp, **kw) == cal32


def test_a_calibration_of_an_older_version_is_measured_again(tiny_llama_dir, tmp_path,
                                                            monkeypatch):
    import json

    from dresd.models import load_model, model_fingerprint

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    model, tok = load_model(tiny_llama_dir)
    fp = model_fingerprint(model, tok)
    path = calibration_path(fp, model.device)
    old = Calibration(fp, "old", 32, (1, 4), (1.0, 1.0), version=1)
    old.save(path)
    saved = json.loads(path.read_text())
    del saved["version"]  # files written before the field existed
    path.write_text(json.dumps(saved))
    assert Calibration.load(path).version == 1
    cal = load_or_measure(model, fp, sizes=(1, 4), past_len=32, repeats=1)
    assert cal.version == VERSION and cal.seconds != (1.0, 1.0)
    assert Calibration.load(path) == cal
    # a file written by a later version (a field this one does not know) still loads
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "version": VERSION + 1, "new_field": 1}))
    assert load_or_measure(model, fp, sizes=(1, 4), past_len=32, repeats=1) == Calibration(
        **{**cal.__dict__, "version": VERSION + 1})


def test_cli_calibrate_prints_and_reuses(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import json

    from dresd.cli import main

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    assert main(["calibrate", "--model", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "measured now" in out and "tree tokens" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert tuple(int(r[0]) for r in rows) == DEFAULT_SIZES
    assert float(rows[0][3]) == 1.0 and float(rows[0][1]) > 0
    assert main(["calibrate", "--model", str(tiny_llama_dir)]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(tiny_llama_dir), "--force"]) == 0
    assert "measured now" in capsys.readouterr().out
    # a file of an older version is measured again, and said so
    path = next((tmp_path / "calibration").glob("*.json"))
    saved = json.loads(path.read_text())
    del saved["version"]
    path.write_text(json.dumps(saved))
    assert main(["calibrate", "--model", str(tiny_llama_dir)]) == 0
    assert "measured now" in capsys.readouterr().out
    assert Calibration.load(path).version == VERSION
    # --dtype: its own file, said in the output; a dtype that is not a float one is refused
    assert main(["calibrate", "--model", str(tiny_llama_dir), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "(bfloat16)" in out and "measured now" in out and "-bfloat16.json" in out
    assert main(["calibrate", "--model", str(tiny_llama_dir), "--dtype", "int8"]) == 2
    assert "unknown floating-point torch dtype 'int8'" in capsys.readouterr().err


def test_calibrated_budget_is_measured_once_per_model_and_device(tiny_llama_dir, tmp_path,
                                                                 monkeypatch):
    from dresd.budget import calibrated_budget
    from dresd.models import load_model, model_fingerprint

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    model, tok = load_model(tiny_llama_dir)
    first = calibrated_budget(model, tok, max_tree_tokens=16)
    path = calibration_path(model_fingerprint(model, tok), model.device)
    assert first.max_tree_tokens == 16 and Calibration.load(path) == first.calibration
    path.unlink()
    again = calibrated_budget(model, tok)  # kept in memory for this model object
    assert again.calibration is first.calibration and not path.exists()
    fresh = calibrated_budget(model, tok, refresh=True)
    assert path.exists() and Calibration.load(path) == fresh.calibration
    with pytest.raises(ValueError, match="tokenizer or the fingerprint"):
        calibrated_budget(load_model(tiny_llama_dir)[0])
