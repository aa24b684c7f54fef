"""The tree budget: fixed and device-calibrated policies, node selection, calibration files."""

import itertools
from pathlib import Path

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

# SmolLM2-135M verify costs on a 2-core x86_64 CPU in float32 (one forward of n new tokens over
# a 300-token KV cache, n = 1, 4, 16, 32, 64), in seconds.
CPU = Calibration("fp", "cpu-test", 300, (1, 4, 16, 32, 64), (0.062, 0.104, 0.134, 0.159, 0.229))
# A GPU-like curve: flat up to 32 tokens.
GPU = Calibration("fp", "gpu-test", 300, (1, 32, 64), (0.010, 0.010, 0.016))
# Cost growing linearly, 30% of a one-token pass per extra token.
LINEAR = Calibration("fp", "linear", 300, (1, 64), (0.010, 0.010 * (1 + 0.3 * 63)))
# Not monotone: a CPU whose float32 matmul kernel is slower for 2-3 rows than for 4.
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


@pytest.fixture
def steady_rounds(monkeypatch):
    """Every calibration counts as reliable, whatever else the machine runs: the tests that
    take it check saving, reuse and printing, which a busy machine (rounds that disagree, so
    a provisional curve measured again or refused) would otherwise decide for them. What
    happens to disagreeing rounds is tested on its own, with a model slowed on purpose."""
    import dresd.calibrate

    monkeypatch.setattr(dresd.calibrate, "TOLERANCE", float("inf"))


def test_load_or_measure_saves_per_model_and_device(tiny_llama_dir, tmp_path, monkeypatch,
                                                   steady_rounds):
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


def test_a_bfloat16_model_keeps_its_own_calibration(tiny_llama_dir, tmp_path, monkeypatch,
                                                   steady_rounds):
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
                                                            monkeypatch, steady_rounds):
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


def test_cli_calibrate_prints_and_reuses(tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                        steady_rounds):
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


def test_a_saved_curve_replaces_the_devices_own(tiny_llama_dir, tmp_path, monkeypatch):
    """use_calibration (benchmarks/replay.py --cost): the budget chooses by the given curve,
    nothing is measured or saved, and refresh goes back to the device's own."""
    from dresd.budget import calibrated_budget, use_calibration
    from dresd.models import load_model

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    model, tok = load_model(tiny_llama_dir)
    gains = [0.9, 0.8, 0.6, 0.5, 0.3, 0.2, 0.1]
    steep = Calibration("x", "cpu", 32, (1, 2, 4, 8), (1.0, 1.6, 2.5, 4.5))
    use_calibration(model, steep)
    assert calibrated_budget(model, tok).calibration is steep
    steep_size = calibrated_budget(model, tok).size(gains)
    gpu = Calibration.load(Path(__file__).resolve().parent.parent / "benchmarks" / "cost_curves"
                           / "h200-float32.json")
    use_calibration(model, gpu)
    budget = calibrated_budget(model, tok, max_tree_tokens=16)
    assert budget.calibration is gpu and budget.max_tree_tokens == 16
    # a pass of 8 tokens costs 1.13 of one on the H200 curve, 4.5 on the steep one
    assert steep_size < budget.size(gains) == len(gains)
    assert not list(tmp_path.rglob("*.json"))  # nothing measured, nothing saved
    own = calibrated_budget(model, tok, refresh=True).calibration
    assert own not in (steep, gpu) and list(tmp_path.rglob("*.json"))


# ------------------------------------------------------------ a cost curve that heals


def drive(policy, true_cost, gains, steps):
    """Steps of a decoder that offers ``gains`` and reports each verify pass at its true cost;
    the node counts the policy chose."""
    chosen = []
    for _ in range(steps):
        k = policy.size(gains)
        policy.observe(k + 1, true_cost(k + 1))
        chosen.append(k)
    return chosen


def test_a_curve_ten_times_too_slow_at_one_token_is_corrected():
    """Saved while the machine was busy: one token measured at 10x its cost. Weak candidates
    then look worth verifying; once a one-token pass is measured (the budget makes one after
    ``explore_every`` steps if no step without candidates did), the budget stops."""
    skewed = Calibration("fp", "cpu-test", 300, CPU.sizes, (10 * CPU.seconds[0],) + CPU.seconds[1:])
    gains = [0.1] * 3
    assert CalibratedBudget(CPU).size(gains) == 0  # on the true curve they do not pay
    policy = CalibratedBudget(skewed, explore_every=8)
    chosen = drive(policy, CPU.cost, gains, 20)
    assert all(k > 0 for k in chosen[:7])  # misled at first
    # then it verifies the root alone, but for one exploring pass per explore_every steps
    assert chosen[7:15] == [0] * 8 and chosen[15] == 3 and chosen[16:] == [0] * 4
    assert policy.explored == 2
    assert policy.cost(1) == pytest.approx(CPU.cost(1), rel=0.05)


def test_a_curve_that_overstates_drafting_is_explored_and_corrected():
    """Every tree above one token saved at 10x its cost: the budget verifies only the root, so
    it never measures a tree; after ``explore_every`` such steps it verifies one anyway, and
    from then on it drafts."""
    skewed = Calibration("fp", "cpu-test", 300, CPU.sizes,
                         (CPU.seconds[0],) + tuple(10 * s for s in CPU.seconds[1:]))
    gains = [0.9 ** (i + 1) for i in range(20)]
    best = CalibratedBudget(CPU).size(gains)
    assert best > 4
    policy = CalibratedBudget(skewed, explore_every=16)
    chosen = drive(policy, CPU.cost, gains, 40)
    assert chosen[:15] == [0] * 15
    assert chosen[15] > 0 and policy.explored == 1
    assert all(k > 0 for k in chosen[16:]) and chosen[-1] == best
    # weak candidates on a curve measured right: one exploring pass per 16 steps, no more
    right = CalibratedBudget(CPU, explore_every=16)
    chosen = drive(right, CPU.cost, [0.01] * 20, 48)
    assert right.explored == 3 and sum(k > 0 for k in chosen) == 3


def test_measured_costs_stay_monotone_and_follow_a_slower_machine():
    policy = CalibratedBudget(CPU)
    for n in (1, 8, 16):
        for _ in range(20):
            policy.observe(n, 3 * CPU.cost(n))  # the machine became 3x slower
    sizes = np.arange(1, 64)
    cost = policy.cost(sizes)
    assert np.all(np.diff(cost) >= -1e-12)
    assert cost[0] == pytest.approx(3 * CPU.cost(1), rel=0.02)
    assert policy.cost(12) == pytest.approx(3 * CPU.cost(12), rel=0.05)  # interpolated
    # nonsense timings are ignored
    policy.observe(4, float("nan"))
    policy.observe(0, 1.0)
    assert policy.cost(4) == pytest.approx(3 * CPU.cost(4), rel=0.05)


def test_calibration_rounds_that_disagree_are_provisional():
    steady = Calibration("fp", "d", 1, (1,), (0.05,), round_seconds=(4.5, 4.6, 4.4))
    busy = Calibration("fp", "d", 1, (1,), (0.05,), round_seconds=(4.5, 30.0, 111.0))
    assert steady.spread < 0.1 < 1 < busy.spread
    assert "spread" in busy.describe_rounds()


def slowing_model(model, step_s):
    """The model on a machine that gets busier every round: each forward sleeps longer, by
    ``step_s / 40`` per call so far, or by its own time / 300 per call where that is more (a
    machine already busy): either way the rounds of both attempts of a calibration (about 400
    forwards each) disagree by more than the tolerance."""
    import time

    forward = model.forward
    calls = [0]

    def slow(*a, **kw):
        calls[0] += 1
        start = time.perf_counter()
        out = forward(*a, **kw)
        took = time.perf_counter() - start
        time.sleep(calls[0] * max(step_s / 40, took / 300))
        return out

    model.forward = slow
    return model


def test_cli_calibrate_refuses_a_noisy_curve(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import dresd.models
    from dresd.cli import main

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    load = dresd.models.load_model

    def load_slowing(*a, **kw):
        model, tokenizer = load(*a, **kw)
        return slowing_model(model, 0.0015), tokenizer

    monkeypatch.setattr(dresd.models, "load_model", load_slowing)
    assert main(["calibrate", "--model", str(tiny_llama_dir), "--attempts", "2"]) == 1
    err = capsys.readouterr().err
    assert "attempt 1/2: unreliable" in err and "NOT saved" in err
    assert not list((tmp_path / "calibration").glob("*.json"))


def test_a_provisional_calibration_is_measured_again(tiny_llama_dir, tmp_path, monkeypatch):
    from dresd.models import load_model, model_fingerprint

    monkeypatch.setenv("DRESD_CACHE", str(tmp_path))
    model, tok = load_model(str(tiny_llama_dir))
    fp = model_fingerprint(model, tok)
    path = calibration_path(fp, model.device)
    busy = Calibration(fp, "d", 32, (1, 4), (0.5, 0.6), round_seconds=(1, 9), provisional=True)
    busy.save(path)
    again = load_or_measure(model, fp, sizes=(1, 4), past_len=32, repeats=2)
    assert again.seconds != busy.seconds and Calibration.load(path) == again
    assert len(again.round_seconds) == 2
