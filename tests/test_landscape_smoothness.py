"""Santurkar et al.'s smoothness measures against their direct definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnjax
from bnjax.curvature.operators import flax_curvature_fns
from bnjax.landscape import smoothness, step_size_grid
from bnjax.noisy import NoisyBatchNorm


def _quadratic_problem():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5))
    a = m @ m.T + np.diag(np.arange(1.0, 6.0))  # symmetric positive definite, known Hessian
    params = {k: jnp.asarray(rng.normal(size=(n,)), jnp.float32) for k, n in [("u", 2), ("v", 3)]}
    return a, params


def _quadratic_loss(a, params, batch):
    w = jnp.concatenate([params["u"], params["v"]])
    return 0.5 * w @ (a @ w) + batch @ w


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_quadratic_gives_exact_beta_smoothness(chunk_size):
    a, params = _quadratic_problem()
    b = np.linspace(-1.0, 1.0, 5)
    loss_fn = functools.partial(_quadratic_loss, jnp.asarray(a, jnp.float32))
    lr = 0.05
    res = jax.jit(lambda p, x: smoothness(loss_fn, p, x, learning_rate=lr, chunk_size=chunk_size))(
        params, jnp.asarray(b, jnp.float32)
    )
    w = np.concatenate([np.asarray(params["u"]), np.asarray(params["v"])]).astype(np.float64)
    g = a @ w + b
    etas = lr * np.linspace(0.5, 4.0, 8)
    # grad L(w - eta g) = g - eta A g, so every ratio equals ||A g|| / ||g||.
    beta = np.linalg.norm(a @ g) / np.linalg.norm(g)
    losses = np.array([0.5 * (w - e * g) @ a @ (w - e * g) + b @ (w - e * g) for e in etas])
    np.testing.assert_allclose(res.step_sizes, etas, rtol=1e-6)
    np.testing.assert_allclose(res.beta_smoothness, beta, rtol=1e-4)
    np.testing.assert_allclose(res.grad_distances, etas * np.linalg.norm(a @ g), rtol=1e-4)
    np.testing.assert_allclose(res.gradient_predictiveness, (etas[-1] - etas[0]) * np.linalg.norm(a @ g), rtol=1e-4)
    np.testing.assert_allclose(res.losses, losses, rtol=1e-4)
    np.testing.assert_allclose(res.loss_variation, losses.max() - losses.min(), rtol=1e-3)
    np.testing.assert_allclose(res.grad_norm, np.linalg.norm(g), rtol=1e-5)


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(6)(x)
        x = bnjax.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = jnp.tanh(x)
        return nn.Dense(3)(x)


def _cross_entropy(logits, labels):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, 3), axis=-1))


@pytest.mark.parametrize("bn_mode,chunk_size", [("train", None), ("train", 2), ("eval", None)])
def test_flax_bn_model_matches_direct_loop(bn_mode, chunk_size):
    model = _BNNet()
    x = jax.random.normal(jax.random.key(0), (10, 4))
    y = jnp.arange(10) % 3
    variables = model.init(jax.random.key(1), x, train=False)
    stats = {"batch_stats": jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])}
    fns = flax_curvature_fns(model.apply, _cross_entropy, bn_mode=bn_mode)
    etas = jnp.array([0.1, 0.4, 0.7, 1.5, 3.0])
    measure = jax.jit(functools.partial(smoothness, fns.loss_fn, step_sizes=etas, chunk_size=chunk_size))
    res = measure(variables["params"], (x, y), stats["batch_stats"])

    # Direct definition, written independently: one Python iteration per step size.
    def loss(params):
        v = {"params": params, **stats}
        if bn_mode == "train":
            out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        else:
            out = model.apply(v, x, train=False)
        return _cross_entropy(out, y)

    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]).astype(np.float64)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    loss0, g = value_and_grad(variables["params"])
    losses, dists = [], []
    for e in np.asarray(etas):
        loss_e, g_e = value_and_grad(jax.tree.map(lambda w, d: w - e * d, variables["params"], g))
        losses.append(float(loss_e))
        dists.append(np.linalg.norm(flat(g) - flat(g_e)))
    losses, dists = np.array(losses), np.array(dists)
    gn = np.linalg.norm(flat(g))
    np.testing.assert_allclose(res.losses, losses, rtol=1e-5)
    np.testing.assert_allclose(res.grad_distances, dists, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.loss_variation, losses.max() - losses.min(), rtol=1e-4)
    np.testing.assert_allclose(res.gradient_predictiveness, dists.max() - dists.min(), rtol=1e-4)
    np.testing.assert_allclose(res.beta_smoothness, np.max(dists / (np.asarray(etas) * gn)), rtol=1e-4)
    np.testing.assert_allclose(res.loss, float(loss0), rtol=1e-6)


def test_step_size_grid_default_and_traced_learning_rate():
    np.testing.assert_allclose(step_size_grid(0.1), 0.1 * np.linspace(0.5, 4.0, 8), rtol=1e-6)
    assert jax.jit(step_size_grid)(0.2).shape == (8,)
    np.testing.assert_allclose(step_size_grid(1.0, low=1.0, high=2.0, num=3), [1.0, 1.5, 2.0])


def test_zero_gradient_gives_zero_beta():
    loss_fn = lambda p, b: jnp.sum(p**2)
    res = smoothness(loss_fn, jnp.zeros(3), None, learning_rate=0.1)
    assert float(res.beta_smoothness) == 0.0 and float(res.loss_variation) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "exactly one"),
        (dict(learning_rate=0.1, step_sizes=jnp.ones(3)), "exactly one"),
        (dict(step_sizes=jnp.ones((2, 2))), "1-D"),
        (dict(step_sizes=jnp.arange(3)), "float"),
        (dict(learning_rate=0.1, chunk_size=0), "chunk_size"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoothness(lambda p, b: jnp.sum(p**2), jnp.ones(3), None, **kwargs)


class _NoisyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(6)(x)
        x = NoisyBatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(jnp.tanh(x))


def test_noisy_bn_model_with_noise_key_in_the_batch():
    # The noise key travels in the batch, so every step size sees the same noise (a deterministic loss).
    model = _NoisyNet()
    x, y = jax.random.normal(jax.random.key(0), (10, 4)), jnp.arange(10) % 3
    variables = model.init(jax.random.key(1), x, train=False)
    apply_fn = lambda v, inputs, train, **kw: model.apply(v, inputs[0], train=train, rngs={"noise": inputs[1]}, **kw)
    fns = flax_curvature_fns(apply_fn, _cross_entropy, bn_mode="train")
    measure = jax.jit(functools.partial(smoothness, fns.loss_fn, step_sizes=jnp.array([0.0, 0.5])))
    key = jax.random.key(7)
    res = measure(variables["params"], ((x, key), y), variables["batch_stats"])
    out, _ = model.apply(variables, x, train=True, rngs={"noise": key}, mutable=["batch_stats"])
    np.testing.assert_allclose(res.loss, _cross_entropy(out, y), rtol=1e-6)
    np.testing.assert_allclose(res.losses[0], res.loss, rtol=1e-6)  # eta = 0: same point, same noise
    np.testing.assert_allclose(res.grad_distances[0], 0.0, atol=1e-6)
    other = measure(variables["params"], ((x, jax.random.key(8)), y), variables["batch_stats"])
    assert abs(float(other.loss) - float(res.loss)) > 1e-4
