"""Precise BN: exact layer-by-layer population statistics against a float64 NumPy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax.precise import batch_norm_layers, precise_batch_stats

EPS = 1e-5


class MLP(nn.Module):
    bn: str = "bnjax"
    convention: str = "flax"
    momentum: float = 0.9

    def _bn(self, train):
        if self.bn == "flax":
            return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=EPS)
        mom = self.momentum if self.convention == "flax" else 1.0 - self.momentum
        return bnjax.BatchNorm(use_running_average=not train, momentum=mom, epsilon=EPS, convention=self.convention)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(5)(x)
        x = nn.relu(self._bn(train)(x))
        x = nn.Dense(3)(x)
        return self._bn(train)(x)


def _data(seed, sizes, dim=4):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, dim)) * 2.0 + 3.0).astype(np.float32) for n in sizes]


def _reference(variables, batches, unbiased):
    """Layer by layer in float64: layer 2's input uses layer 1's precise statistics."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    x = np.concatenate(batches).astype(np.float64)
    h1 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    ddof = 1 if unbiased else 0
    m1, v1 = h1.mean(0), h1.var(0, ddof=ddof)
    a = np.maximum((h1 - m1) / np.sqrt(v1 + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"], 0)
    h2 = a @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return (m1, v1), (h2.mean(0), h2.var(0, ddof=ddof))


@pytest.mark.parametrize("bn,convention", [("bnjax", "flax"), ("bnjax", "torch"), ("flax", "flax")])
def test_matches_layerwise_reference_with_uneven_batches(bn, convention):
    model = MLP(bn=bn, convention=convention)
    batches = _data(0, [7, 7, 3])
    variables = model.init(jax.random.key(0), batches[0])
    # Perturb the BN params so that layer 2's input really depends on layer 1's statistics.
    variables["params"]["BatchNorm_0"]["scale"] = jnp.linspace(0.5, 2.0, 5)
    variables["params"]["BatchNorm_0"]["bias"] = jnp.linspace(-1.0, 1.0, 5)
    stats = precise_batch_stats(lambda v, b: model.apply(v, b), variables, batches, progress=False)
    (m1, v1), (m2, v2) = _reference(variables, batches, unbiased=convention == "torch")
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], m1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], v1, rtol=1e-4)
    np.testing.assert_allclose(stats["BatchNorm_1"]["mean"], m2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_1"]["var"], v2, rtol=1e-4)
    if convention == "torch":
        assert int(stats["BatchNorm_0"]["num_batches_tracked"]) == 0
    # Inputs untouched; params are not part of the result.
    assert set(stats) == set(variables["batch_stats"])
    np.testing.assert_array_equal(variables["batch_stats"]["BatchNorm_0"]["mean"], np.zeros(5))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(3, (3,), use_bias=False)(x)
        return bnjax.BatchNorm(use_running_average=not train)(x)


def test_conv_statistics_reduce_batch_and_spatial_axes_and_honour_callable_source():
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(n, 6, 2)).astype(np.float32) + 5.0 for n in (4, 2)]
    model = ConvNet()
    variables = model.init(jax.random.key(1), batches[0])
    calls = []

    def source():
        calls.append(1)
        return iter(batches)

    stats = precise_batch_stats(lambda v, b: model.apply(v, b), variables, source, progress=False)
    k = np.asarray(variables["params"]["Conv_0"]["kernel"], np.float64)
    x = np.concatenate(batches).astype(np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    conv = sum(np.einsum("nwc,co->nwo", xp[:, i : i + 6], k[i]) for i in range(3))
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], conv.mean((0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], conv.var((0, 1)), rtol=1e-4)
    assert len(calls) == 2  # one probe, one pass for the single BN layer


def test_layers_in_call_order_and_generator_rejected():
    model = MLP()
    batches = _data(2, [4, 4])
    variables = model.init(jax.random.key(0), batches[0])
    apply = lambda v, b: model.apply(v, b)  # noqa: E731
    assert batch_norm_layers(apply, variables, batches[0]) == (("BatchNorm_0",), ("BatchNorm_1",))
    with pytest.raises(TypeError, match="one-shot iterator"):
        precise_batch_stats(apply, variables, (b for b in batches), progress=False)
    with pytest.raises(ValueError, match="batch_stats"):
        precise_batch_stats(apply, {"params": variables["params"]}, batches, progress=False)


def test_shared_layer_rejected():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            bn = bnjax.BatchNorm(use_running_average=True)
            return bn(bn(x))

    x = jnp.ones((3, 2))
    model = Shared()
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="more than once"):
        precise_batch_stats(lambda v, b: model.apply(v, b), variables, [x], progress=False)


@pytest.mark.parametrize("momentum", [0.999, 0.0])
def test_reduces_train_eval_gap(momentum):
    """A model trained with a far too high (stale) or zero (last batch only) momentum evaluates badly with its
    EWMA statistics; precise statistics bring eval-mode outputs close to the full-batch train-mode outputs."""
    rng = np.random.default_rng(3)
    w_true = rng.normal(size=(4, 1))
    x_all = (rng.normal(size=(256, 4)) * 3.0 + 2.0).astype(np.float32)
    y_all = (np.tanh(x_all @ w_true / 4) + 0.1 * rng.normal(size=(256, 1))).astype(np.float32)
    model = MLP(momentum=momentum)
    variables = model.init(jax.random.key(0), x_all[:8])
    tx = optax.adam(1e-2)
    opt = tx.init(variables["params"])

    def loss(params, stats, x, y):
        out, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.mean((out[:, :1] - y) ** 2), upd["batch_stats"]

    @jax.jit
    def train_step(params, stats, opt, x, y):
        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x, y)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), stats, opt

    params, stats = variables["params"], variables["batch_stats"]
    for step in range(60):
        i = (step * 8) % 256
        params, stats, opt = train_step(params, stats, opt, x_all[i : i + 8], y_all[i : i + 8])

    # Target: the same model normalizing with full-data statistics, i.e. train mode on all data at once.
    trained = {"params": params, "batch_stats": stats}
    target, _ = model.apply(trained, x_all, train=True, mutable=["batch_stats"])

    def gap(s):
        return float(jnp.mean((model.apply({"params": params, "batch_stats": s}, x_all) - target) ** 2))

    batches = [x_all[i : i + 32] for i in range(0, 256, 32)]
    precise = precise_batch_stats(lambda v, b: model.apply(v, b), trained, batches, progress=False)
    gap_ewma, gap_precise = gap(stats), gap(precise)
    assert gap_ewma > 1e-2
    assert gap_precise < 1e-3 * gap_ewma
