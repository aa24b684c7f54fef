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
