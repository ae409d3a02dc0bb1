"""Loss slices against direct loss evaluation; filter normalization's defining property."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.landscape import filter_normalize, interpolation, slice_1d, slice_2d
from bnjax.landscape import random_direction as _random_direction

# One compilation per configuration instead of one per eager op.
random_direction = jax.jit(_random_direction, static_argnames=("filter_axis", "bias_bn"))


def _params(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "conv": {"kernel": jax.random.normal(k1, (2, 2, 3, 4)), "bias": jax.random.normal(k2, (4,))},
        "dense": {"kernel": jax.random.normal(k3, (4, 2)) * 3.0, "bias": jnp.zeros((2,))},
        "bn": {"scale": jax.random.uniform(k4, (4,)) + 0.5},
    }


def _loss(params, batch, shift):
    x, y = batch  # x: (N, 5, 5, 3)
    h = jax.lax.conv_general_dilated(
        x, params["conv"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + params["conv"]["bias"][None, None, None]) * params["bn"]["scale"][None, None, None]
    out = jnp.mean(h, axis=(1, 2)) @ params["dense"]["kernel"] + params["dense"]["bias"][None]
    return jnp.mean((out - y) ** 2) + shift


def _batch():
    return jax.random.normal(jax.random.key(10), (6, 5, 5, 3)), jax.random.normal(jax.random.key(11), (6, 2))


@pytest.mark.parametrize("filter_axis", [-1, 0])
def test_filter_normalization_matches_filter_norms(filter_axis):
    params = _params(jax.random.key(0))
    d = random_direction(jax.random.key(1), params, filter_axis=filter_axis)
    for name in ["conv", "dense"]:
        w, v = np.asarray(params[name]["kernel"], np.float64), np.asarray(d[name]["kernel"], np.float64)
        axes = tuple(a for a in range(w.ndim) if a != filter_axis % w.ndim)
        np.testing.assert_allclose(np.sqrt((v**2).sum(axes)), np.sqrt((w**2).sum(axes)), rtol=1e-5)
        assert not np.allclose(v, w)  # a random direction, not the weights
    for leaf in [d["conv"]["bias"], d["dense"]["bias"], d["bn"]["scale"]]:
        np.testing.assert_array_equal(leaf, 0.0)
    kept = filter_normalize(jax.tree.map(jnp.ones_like, params), params, bias_bn="weights")
    np.testing.assert_array_equal(kept["bn"]["scale"], params["bn"]["scale"])
    np.testing.assert_array_equal(kept["conv"]["bias"], params["conv"]["bias"])
    # Deterministic for a key; different keys differ.
    again = random_direction(jax.random.key(1), params, filter_axis=filter_axis)
    jax.tree.map(np.testing.assert_array_equal, d, again)
    other = random_direction(jax.random.key(2), params, filter_axis=filter_axis)
    assert not np.allclose(other["dense"]["kernel"], d["dense"]["kernel"])


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_interpolation_and_1d_slice_match_direct_evaluation(chunk_size):
    pa, pb = _params(jax.random.key(0)), _params(jax.random.key(5))
    batch, shift = _batch(), jnp.float32(0.25)
    alphas = jnp.linspace(-0.5, 1.5, 9)
    run = jax.jit(functools.partial(interpolation, _loss, chunk_size=chunk_size))
    got = run(pa, pb, batch, shift, alphas=alphas)
    direct = [float(_loss(jax.tree.map(lambda a, b: (1 - t) * a + t * b, pa, pb), batch, shift)) for t in alphas]
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[[2, 6]], [_loss(pa, batch, shift), _loss(pb, batch, shift)], rtol=1e-5)

    d = random_direction(jax.random.key(3), pa)
    run = jax.jit(functools.partial(slice_1d, _loss, chunk_size=chunk_size))
    got = run(pa, batch, shift, direction=d, alphas=alphas)
    direct = [float(_loss(jax.tree.map(lambda w, v: w + t * v, pa, d), batch, shift)) for t in alphas]
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    assert np.ptp(direct) > 1e-2  # the slice actually moves


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_2d_slice_matches_direct_evaluation(chunk_size):
    params, batch = _params(jax.random.key(0)), _batch()
    dx = random_direction(jax.random.key(3), params)
    dy = random_direction(jax.random.key(4), params)
    alphas, betas = jnp.linspace(-1.0, 1.0, 4), jnp.linspace(-0.5, 0.5, 3)
    run = jax.jit(functools.partial(slice_2d, _loss, chunk_size=chunk_size))
    got = run(params, batch, 0.0, directions=(dx, dy), alphas=alphas, betas=betas)
    assert got.shape == (4, 3)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            p = jax.tree.map(lambda w, u, v: w + a * u + b * v, params, dx, dy)
            np.testing.assert_allclose(got[i, j], _loss(p, batch, 0.0), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    params, batch = _params(jax.random.key(0)), _batch()
    d = random_direction(jax.random.key(3), params)
    with pytest.raises(ValueError, match="alphas"):
        slice_1d(_loss, params, batch, 0.0, direction=d, alphas=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="direction"):
        slice_1d(_loss, params, batch, 0.0, direction={"dense": d["dense"]}, alphas=jnp.ones(3))
    with pytest.raises(ValueError, match="directions"):
        slice_2d(_loss, params, batch, 0.0, directions=(d,), alphas=jnp.ones(2), betas=jnp.ones(2))
    with pytest.raises(ValueError, match="bias_bn"):
        filter_normalize(d, params, bias_bn="keep")
    with pytest.raises(ValueError, match="filter_axis"):
        filter_normalize(d, params, filter_axis=5)
    with pytest.raises(ValueError, match="params_b"):
        interpolation(_loss, params, d["dense"], batch, 0.0, alphas=jnp.ones(2))
