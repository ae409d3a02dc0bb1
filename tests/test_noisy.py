"""NoisyBatchNorm and STIM18's non-stationary noise: statistics over many draws, eval identity, determinism."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import bnjax
from bnjax.noisy import (
    NoisyBatchNorm,
    add_nonstationary_noise,
    noisy_batch_norm,
    sample_nonstationary_noise,
)
from tests import reference

# One compilation per configuration (eager dispatch compiles every random op separately).
sample_nonstationary_noise = jax.jit(
    sample_nonstationary_noise, static_argnames=("shape", "axis", "n_mu", "n_sigma", "r_mu", "r_sigma", "dtype")
)

MAGNITUDES = [
    dict(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.1),
    dict(n_mu=2.0, n_sigma=3.0, r_mu=0.5, r_sigma=0.3),
]


@pytest.mark.parametrize("mag", MAGNITUDES)
def test_unit_parameters_are_uniform_over_many_draws(mag):
    keys = jax.random.split(jax.random.key(0), 1000)
    draw = jax.vmap(lambda k: sample_nonstationary_noise(k, (2, 3), **mag))(keys)
    mu = np.asarray(draw.unit_mean).ravel()
    sigma = np.asarray(draw.unit_std).ravel()
    assert stats.kstest(mu, stats.uniform(-mag["n_mu"], 2 * mag["n_mu"]).cdf).pvalue > 1e-3
    assert stats.kstest(sigma, stats.uniform(1.0, mag["n_sigma"] - 1.0).cdf).pvalue > 1e-3
    # Redrawn at every step: independent across keys, not one fixed draw.
    assert np.corrcoef(np.asarray(draw.unit_mean)[:-1, 0], np.asarray(draw.unit_mean)[1:, 0])[0, 1] < 0.1


@pytest.mark.parametrize(
    "mag,shape,axis",
    [
        (MAGNITUDES[0], (4000, 3), -1),
        (MAGNITUDES[1], (4000, 3), -1),
        (MAGNITUDES[0], (250, 4, 4, 3), -1),
        (MAGNITUDES[1], (250, 3, 4, 4), 1),
    ],
)
def test_per_sample_noise_statistics(mag, shape, axis):
    draw = sample_nonstationary_noise(jax.random.key(1), shape, axis=axis, **mag)
    feat = axis % len(shape)
    red = tuple(i for i in range(len(shape)) if i != feat)
    n = int(np.prod([shape[i] for i in red]))
    bshape = [1] * len(shape)
    bshape[feat] = shape[feat]
    mu = np.asarray(draw.unit_mean).reshape(bshape)
    sigma = np.asarray(draw.unit_std).reshape(bshape)
    m = np.asarray(draw.shift, np.float64)
    s = np.asarray(draw.scale, np.float64)
    assert draw.unit_mean.shape == (shape[feat],) and m.shape == shape and s.shape == shape
    # m_ij ~ U(mu_j - r_mu, mu_j + r_mu): inside the interval, filling it, with the uniform's mean and std.
    assert np.all(np.abs(m - mu) <= mag["r_mu"] * (1 + 1e-6))
    np.testing.assert_array_less(np.abs((m - mu).max(axis=red)) - mag["r_mu"], 0.01 * mag["r_mu"] + 1e-7)
    np.testing.assert_array_less(-(m - mu).min(axis=red) - mag["r_mu"], 0.01 * mag["r_mu"] + 1e-7)
    se_m = mag["r_mu"] / np.sqrt(3 * n)
    np.testing.assert_allclose(m.mean(axis=red, keepdims=True), mu, atol=5 * se_m)
    np.testing.assert_allclose(m.std(axis=red), mag["r_mu"] / np.sqrt(3), rtol=0.08)
    # s_ij ~ N(sigma_j, r_sigma), r_sigma a standard deviation.
    np.testing.assert_allclose(s.mean(axis=red, keepdims=True), sigma, atol=5 * mag["r_sigma"] / np.sqrt(n))
    np.testing.assert_allclose(s.std(axis=red), mag["r_sigma"], rtol=0.08)
    z = ((s - sigma) / mag["r_sigma"]).ravel()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Conv: every spatial position is its own sample (no sharing across positions).
    if len(shape) == 4:
        spatial = tuple(i for i in red if i != 0)
        within = np.sqrt((s.var(axis=spatial) * 16 / 15).mean())
        np.testing.assert_allclose(within, mag["r_sigma"], rtol=0.05)


def test_add_noise_is_scale_times_y_plus_shift():
    key = jax.random.key(3)
    y = jax.random.normal(jax.random.key(4), (6, 2, 5))
    draw = sample_nonstationary_noise(key, y.shape, axis=(1, 2))
    out = jax.jit(add_nonstationary_noise, static_argnames="axis")(key, y, axis=(1, 2))
    np.testing.assert_allclose(out, draw.scale * y + draw.shift, rtol=1e-6, atol=1e-6)
    assert draw.unit_mean.shape == (2, 5)
    y16 = y.astype(jnp.bfloat16)
    assert add_nonstationary_noise(key, y16, axis=(1, 2)).dtype == jnp.bfloat16


def test_functional_noisy_batch_norm_matches_reference():
    x = jax.random.normal(jax.random.key(5), (16, 4)) * 3 + 1
    key = jax.random.key(6)
    scale, bias = jnp.arange(1.0, 5.0), jnp.arange(4.0) - 1
    state = bnjax.init_state((4,))
    y, new_state = noisy_batch_norm(x, scale, bias, state, key=key, train=True, momentum=0.9)
    y_ref, mean, var, _ = reference.bn_forward(x, scale, bias)
    draw = sample_nonstationary_noise(key, x.shape)
    np.testing.assert_allclose(y, np.asarray(draw.scale) * y_ref + np.asarray(draw.shift), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    y_eval, same = noisy_batch_norm(x, scale, bias, new_state, key=None, train=False)
    y_bn, _ = bnjax.batch_norm(x, scale, bias, new_state, train=False)
    np.testing.assert_array_equal(y_eval, y_bn)
    assert same is new_state


@pytest.mark.parametrize("sync", ["gather", "allreduce"])
def test_module_with_axis_name_under_nn_vmap_keeps_clean_global_statistics(sync):
    """``NoisyBatchNorm(axis_name=..., sync=...)`` under ``nn.vmap`` with shared batch_stats: the running
    statistics are those of the clean flattened batch (the noise comes after BN)."""
    x = jax.random.normal(jax.random.key(7), (4, 6, 3)) * 2 + 1
    mapped = nn.vmap(
        NoisyBatchNorm,
        in_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False, "noise": True},
        axis_name="d",
    )(use_running_average=False, momentum=0.9, axis_name="d", sync=sync)
    variables = mapped.init(jax.random.key(0), x)
    _, upd = mapped.apply(variables, x, rngs={"noise": jax.random.key(1)}, mutable=["batch_stats"])
    _, mean, var, _ = reference.bn_forward(np.asarray(x).reshape(24, 3))
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


def _variables(module, x):
    mode = {} if module.use_running_average is not None else {"use_running_average": False}
    return module.init(jax.random.key(0), x, **mode)


@pytest.mark.parametrize("shape,axis", [((32, 3), -1), ((8, 3, 4, 4), 1)])
def test_module_variables_and_eval_mode_match_batchnorm(shape, axis):
    x = jax.random.normal(jax.random.key(7), shape) * 2 + 0.5
    noisy, plain = NoisyBatchNorm(axis=axis, momentum=0.8), bnjax.BatchNorm(axis=axis, momentum=0.8)
    v_noisy, v_plain = _variables(noisy, x), _variables(plain, x)
    assert jax.tree.structure(v_noisy) == jax.tree.structure(v_plain)
    jax.tree.map(np.testing.assert_array_equal, v_noisy, v_plain)
    # Train mode: identical running statistics (those of the clean batch).
    _, up_noisy = noisy.apply(
        v_noisy, x, use_running_average=False, mutable=["batch_stats"], rngs={"noise": jax.random.key(1)}
    )
    _, up_plain = plain.apply(v_plain, x, use_running_average=False, mutable=["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), up_noisy, up_plain)
    v_trained = {"params": v_plain["params"], **up_plain}
    y_noisy = noisy.apply(v_trained, x, use_running_average=True)  # no "noise" rng needed
    y_plain = plain.apply(v_trained, x, use_running_average=True)
    np.testing.assert_array_equal(y_noisy, y_plain)


def test_module_train_mode_noise_statistics_and_determinism():
    x = jax.random.normal(jax.random.key(8), (4096, 3)) * 5 - 2
    module = NoisyBatchNorm(use_running_average=False)
    variables = _variables(module, x)
    apply = jax.jit(lambda v, x, k: module.apply(v, x, mutable=["batch_stats"], rngs={"noise": k})[0])
    y1, y2 = apply(variables, x, jax.random.key(1)), apply(variables, x, jax.random.key(1))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, apply(variables, x, jax.random.key(2)))
    # Clean BN output has mean 0, std 1 per unit; the noise moves them to mu_j in [-n_mu, n_mu] and
    # std sqrt(sigma_j^2 + r_sigma^2 + r_mu^2 / 3), sigma_j in [1, n_sigma].
    means, stds = [], []
    for k in range(20):
        y = np.asarray(apply(variables, x, jax.random.key(100 + k)), np.float64)
        means.append(y.mean(0))
        stds.append(y.std(0))
    means, stds = np.concatenate(means), np.concatenate(stds)
    tol = 0.05
    assert np.all(np.abs(means) <= 0.5 + tol) and means.max() > 0.25 and means.min() < -0.25
    lo, hi = np.sqrt(1 + 0.01 + 0.01 / 3), np.sqrt(1.25**2 + 0.01 + 0.01 / 3)
    assert np.all((stds > lo - tol) & (stds < hi + tol))
    assert stds.max() - stds.min() > 0.1


def test_module_needs_noise_rng_in_train_mode():
    x = jnp.ones((4, 2)).at[0].set(0.0)
    module = NoisyBatchNorm(use_running_average=False)
    variables = _variables(module, x)
    with pytest.raises(Exception, match="noise"):
        module.apply(variables, x, mutable=["batch_stats"])


@pytest.mark.parametrize("bad", [dict(n_sigma=0.5), dict(n_mu=-1.0), dict(r_mu=-0.1), dict(r_sigma=-0.1)])
def test_invalid_magnitudes_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        sample_nonstationary_noise(jax.random.key(0), (4, 2), **bad)
    x = jnp.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError, match=next(iter(bad))):
        NoisyBatchNorm(**bad).init(jax.random.key(0), x, use_running_average=True)


def test_train_without_key_raises():
    with pytest.raises(ValueError, match="key"):
        noisy_batch_norm(jnp.arange(8.0).reshape(4, 2), key=None, train=True)
