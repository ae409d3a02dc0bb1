"""`bnjax.nnx.BatchNorm` matches `flax.nnx.BatchNorm(use_fast_variance=False)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax.nnx


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9, epsilon=1e-3), dict(use_bias=False, use_scale=False)])
@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((4, 3, 3, 5), -1), ((4, 5, 3), 1)])
def test_matches_flax_nnx(kwargs, shape, axis):
    x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 1.0
    ours = bnjax.nnx.BatchNorm(5, axis=axis, rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.BatchNorm(5, axis=axis, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    for step in range(2):
        xs = x * (step + 1.0)
        np.testing.assert_allclose(ours(xs), theirs(xs), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5)
    np.testing.assert_allclose(
        ours(x, use_running_average=True), theirs(x, use_running_average=True), rtol=1e-5, atol=1e-5
    )
    # Same variable layout, so NNX states are interchangeable.
    s_ours, s_theirs = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)


def test_works_under_nnx_jit_and_grad():
    model = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (6, 3)) + 2.0

    @nnx.jit
    def step(model, x):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2 * jnp.arange(1.0, 4.0)[None, :]))(model)

    grads = step(model, x)
    assert grads["scale"][...].shape == (3,)
    np.testing.assert_allclose(model.mean[...], 0.01 * np.mean(x, 0), rtol=1e-5)  # updated once, in place
