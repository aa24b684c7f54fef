"""The composite's online node model (dresd.drafters.node_model)."""

import numpy as np
import pytest

from dresd.drafters.node_model import NodeAcceptanceModel


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _feed(model, rng, steps, weights, rows_per_step=12):
    """``steps`` scored steps of examples drawn from the logistic law ``weights`` (intercept
    first)."""
    for _ in range(steps):
        x = rng.normal(size=(rows_per_step, model.num_features))
        p = _sigmoid(weights[0] + x @ weights[1:])
        model.add(x, (rng.random(rows_per_step) < p).astype(float))


def test_nothing_is_predicted_before_enough_examples():
    model = NodeAcceptanceModel(3, min_examples=100)
    rng = np.random.default_rng(0)
    assert model.predict(np.zeros((2, 3))) is None
    _feed(model, rng, 8, np.array([0.0, 1.0, 0.0, 0.0]))  # 96 examples
    assert not model.fitted and model.predict(np.zeros((2, 3))) is None
    _feed(model, rng, 1, np.array([0.0, 1.0, 0.0, 0.0]))
    assert model.fitted and model.predict(np.zeros((2, 3))).shape == (2,)


def test_it_learns_a_logistic_law():
    rng = np.random.default_rng(1)
    law = np.array([-0.5, 2.0, -1.0, 0.0])
    model = NodeAcceptanceModel(3, decay=1.0)
    _feed(model, rng, 300, law)
    x = rng.normal(size=(2000, 3))
    truth = _sigmoid(law[0] + x @ law[1:])
    assert np.abs(model.predict(x) - truth).mean() < 0.03
    constant = np.abs(truth - truth.mean()).mean()
    assert constant > 0.2  # so the bound above says something


def test_recent_steps_outweigh_old_ones():
    """After the law changes, the fit follows the new one within a few hundred steps (decay
    0.99 per step), though the window still holds examples of the old one."""
    rng = np.random.default_rng(2)
    model = NodeAcceptanceModel(2, capacity=8192)
    _feed(model, rng, 300, np.array([0.0, 3.0, 0.0]))
    _feed(model, rng, 300, np.array([0.0, -3.0, 0.0]))
    assert model.examples == 7200  # both laws are held
    x = np.array([[1.0, 0.0], [-1.0, 0.0]])
    p = model.predict(x)
    assert p[0] < 0.15 and p[1] > 0.85
    stale = NodeAcceptanceModel(2, capacity=8192, decay=1.0)
    rng = np.random.default_rng(2)
    _feed(stale, rng, 300, np.array([0.0, 3.0, 0.0]))
    _feed(stale, rng, 300, np.array([0.0, -3.0, 0.0]))
    assert abs(stale.predict(x)[0] - 0.5) < 0.2  # without decay the two laws cancel


def test_the_window_keeps_the_latest_examples():
    model = NodeAcceptanceModel(1, capacity=10, min_examples=5, refit_every=1)
    model.add(np.zeros((25, 1)), np.zeros(25))
    model.add(np.ones((4, 1)), np.ones(4))
    assert model.examples == 10
    assert sorted(model._y[:10].tolist()) == [0.0] * 6 + [1.0] * 4


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="decay"):
        NodeAcceptanceModel(3, decay=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        NodeAcceptanceModel(0)
    with pytest.raises(ValueError, match="ridge"):
        NodeAcceptanceModel(3, ridge=-1.0)
    model = NodeAcceptanceModel(3)
    with pytest.raises(ValueError, match="2 feature rows but 3 labels"):
        model.add(np.zeros((2, 3)), np.zeros(3))


def test_the_window_keeps_the_latest_examples_across_a_wrap():
    model = NodeAcceptanceModel(1, capacity=10, min_examples=5, refit_every=1)
    model.add(np.arange(25.0)[:, None], np.zeros(25))
    assert sorted(model._x[:, 0].tolist()) == list(range(15, 25))
    model.add(np.arange(100.0, 107.0)[:, None], np.ones(7))
    assert sorted(model._x[:, 0].tolist()) == [22.0, 23.0, 24.0] + list(range(100, 107))
    ages = {x: model.steps - 1 - s for x, s in zip(model._x[:, 0], model._step)}
    assert ages[22.0] == 1 and ages[106.0] == 0
    model.add(np.arange(200.0, 205.0)[:, None], np.ones(5))  # wraps mid-batch
    assert sorted(model._x[:, 0].tolist()) == list(range(102, 107)) + list(range(200, 205))


def test_the_decay_is_about_a_hundred_steps():
    """300 steps of one law, then 70 of the opposite: at decay 0.99 the two weigh about the
    same (0.99 ** 70 ~ 0.5), so the fit is near flat; a decay ten times stronger or weaker
    tips it."""
    rng = np.random.default_rng(3)
    model = NodeAcceptanceModel(2)
    _feed(model, rng, 300, np.array([0.0, 3.0, 0.0]))
    _feed(model, rng, 70, np.array([0.0, -3.0, 0.0]))
    assert 0.3 < model.predict(np.array([[1.0, 0.0]]))[0] < 0.7


def test_a_value_rare_in_the_window_does_not_make_it_certain():
    """A column that is 1 in only three old examples (and 0 in thousands) stands far out once
    standardised; clipped, it cannot push a prediction to near-certainty."""
    rng = np.random.default_rng(4)
    model = NodeAcceptanceModel(2)
    for step in range(700):
        x = np.column_stack([rng.normal(size=12), np.zeros(12)])
        y = (rng.random(12) < 0.3).astype(float)
        if step in (100, 300, 600):
            x[0, 1], y[0] = 1.0, 1.0
        model.add(x, y)
    p = model.predict(np.array([[0.0, 0.0], [0.0, 1.0]]))
    assert abs(p[0] - 0.3) < 0.05 and p[1] < 0.9


def test_fit_with_nothing_held_does_nothing():
    model = NodeAcceptanceModel(2)
    model.fit()
    assert not model.fitted and model.predict(np.zeros((1, 2))) is None
