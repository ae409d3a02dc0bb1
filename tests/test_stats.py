"""The seed statistics of the experiments (experiments.stats) against hand-computed references, and runs over
seeds (experiments.train.init_seed_states / over_seeds) against one run per seed."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import data, models, stats, train


def test_interval_is_the_student_t_interval():
    v = np.array([1.0, 2.0, 4.0])
    iv = stats.interval(v)
    half = 4.303 * np.std(v, ddof=1) / math.sqrt(3)  # t_{0.975, 2} = 4.303
    assert iv.n == 3 and iv.mean == pytest.approx(7 / 3)
    assert (iv.low, iv.high) == pytest.approx((7 / 3 - half, 7 / 3 + half))


def test_interval_leaves_out_non_finite_values():
    iv = stats.interval([1.0, np.nan, 3.0, np.inf])
    assert iv.n == 2 and iv.mean == 2.0
    assert stats.interval([np.nan]).n == 0 and math.isinf(stats.interval([5.0]).high)


def test_ratio_interval_is_geometric_and_paired():
    a, b = np.array([1.0, 2.0, 4.0]), np.array([2.0, 4.0, 8.0])  # every ratio 0.5: zero width
    iv = stats.ratio_interval(a, b)
    assert iv.mean == pytest.approx(0.5) and iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)
    iv = stats.ratio_interval([1.0, 4.0, np.nan], [2.0, 2.0, 1.0])  # the diverged seed is left out
    assert iv.n == 2 and iv.mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one value per seed"):
        stats.ratio_interval([1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("low", "high", "n", "claimed", "expected"),
    [
        (0.3, 0.8, 3, "below", "held"),
        (1.2, 2.0, 3, "below", "not held"),
        (0.7, 1.3, 3, "below", "inconclusive"),
        (1.2, 2.0, 3, "above", "held"),
        (0.3, 0.8, 3, "above", "not held"),
        (0.3, 0.8, 1, "below", "inconclusive"),  # one seed: no interval, no verdict
    ],
)
def test_interval_verdict_follows_the_rule(low, high, n, claimed, expected):
    assert stats.interval_verdict(stats.Interval(0.5, low, high, n), claimed) == expected


def test_t95_and_format():
    assert stats.t95(2) == 4.303 and stats.t95(25) == 2.086 and stats.t95(100) == 1.96
    with pytest.raises(ValueError, match="dof"):
        stats.t95(0)
    assert stats.format_ratio(stats.Interval(0.456, 0.31, 0.68, 3)) == "0.456x [0.31, 0.68], 3 seeds"
    assert stats.format_ratio(stats.Interval(math.nan, -math.inf, math.inf, 0)) == "no seed finished"


def _setup():
    ds = data.subset(data.mnist1d(42), 64)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    model = models.MLP(features=(16,), norm="bn", activation="tanh")
    return model, x, y


@pytest.mark.parametrize("minibatch", [False, True])
def test_runs_over_seeds_equal_one_run_per_seed(minibatch):
    model, x, y = _setup()
    optimizer = optax.sgd(0.1)
    step = train.make_train_step(model, "square", optimizer)
    make = (
        (lambda o: train.minibatch_runner(step, 16, over_seeds=o))
        if minibatch
        else (lambda o: train.full_batch_runner(step, over_seeds=o))
    )
    seeds = (0, 3)
    _, batched = make(True)(train.init_seed_states(model, x[:2], optimizer, seeds), x, y, 4)
    assert np.asarray(batched.loss).shape == (4, 2)
    for i, s in enumerate(seeds):
        _, single = make(False)(train.init_train_state(model, x[:2], optimizer, s), x, y, 4)
        np.testing.assert_allclose(np.asarray(batched.loss)[:, i], np.asarray(single.loss), rtol=1e-5)


def test_a_diverged_seed_is_recorded_and_the_others_go_on():
    model, x, y = _setup()
    optimizer = optax.sgd(0.1)
    state = train.init_seed_states(model, x[:2], optimizer, (0, 1))
    # Seed 1 starts from NaN parameters: its losses are non-finite from step 0, seed 0 trains on.
    state = state._replace(params=jax.tree.map(lambda p: p.at[1].set(jnp.nan), state.params))
    run = train.full_batch_runner(train.make_train_step(model, "square", optimizer), over_seeds=True)
    log = train.train_in_segments(run, state, x, y, num_steps=6, every=3)
    assert log.diverged_at.tolist() == [-1, 0]
    assert log.losses.shape == (2, 6) and np.all(np.isfinite(log.losses[0]))
    with pytest.raises(train.Diverged):
        every_seed = state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        train.train_in_segments(run, every_seed, x, y, num_steps=6, every=3)
