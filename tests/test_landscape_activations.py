"""Layer-input statistics captured from an unmodified Flax model, against a hand-written forward pass."""

import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

import bnjax
from bnjax.landscape import activation_statistics, capture_inputs, histogram_edges, module_call_order
from bnjax.noisy import NoisyBatchNorm

EPS = 1e-5


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        x = bnjax.BatchNorm(use_running_average=not train, epsilon=EPS)(x)
        x = nn.relu(x)
        x = nn.Dense(3)(x)
        x = NoisyBatchNorm(use_running_average=not train, epsilon=EPS)(x)
        return nn.Dense(2)(x)


def _setup():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (64, 5)) * 2 + 1
    variables = model.init(jax.random.key(1), x, train=False)
    return model, x, variables


def _direct_inputs(variables, x):
    """Eval-mode forward pass written out by hand (running stats: mean 0, var 1), float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x = np.asarray(x, np.float64)
    h0 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    b0 = h0 / np.sqrt(1 + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
    d1 = np.maximum(b0, 0)
    h1 = d1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    b1 = h1 / np.sqrt(1 + EPS) * p["NoisyBatchNorm_0"]["scale"] + p["NoisyBatchNorm_0"]["bias"]
    return {"Dense_0": x, "Dense_1": d1, "Dense_2": b1}, {"BatchNorm_0": h0, "NoisyBatchNorm_0": h1}


@pytest.mark.parametrize("bins,value_range", [(16, (-3.0, 3.0)), (7, (0.0, 1.0))])
def test_statistics_match_direct_forward_pass(bins, value_range):
    model, x, variables = _setup()
    run = jax.jit(
        functools.partial(activation_statistics, model.apply, train=False, bins=bins, value_range=value_range)
    )
    stats = run(variables, x)
    dense_inputs, _ = _direct_inputs(variables, x)
    assert list(stats) == ["Dense_0", "Dense_1", "Dense_2"]
    edges = np.asarray(histogram_edges(bins, value_range), np.float64)
    for name, ref in dense_inputs.items():
        s = stats[name]
        np.testing.assert_allclose(s.mean, ref.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.std, ref.std(0), rtol=1e-5, atol=1e-5)
        hist, _ = np.histogram(ref.ravel(), bins=edges)
        np.testing.assert_array_equal(s.histogram, hist)
        assert float(s.below) == np.sum(ref < value_range[0]) and float(s.above) == np.sum(ref > value_range[1])
        assert float(s.histogram.sum() + s.below + s.above) == ref.size


def test_bn_inputs_captured_once_per_module_including_subclass():
    model, x, variables = _setup()
    _, bn_inputs = _direct_inputs(variables, x)
    got = capture_inputs(model.apply, variables, x, train=False, modules=(bnjax.BatchNorm,))
    # NoisyBatchNorm subclasses BatchNorm and calls super().__call__: still one capture.
    assert list(got) == ["BatchNorm_0", "NoisyBatchNorm_0"]
    for name, ref in bn_inputs.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5)
    by_predicate = capture_inputs(model.apply, variables, x, train=False, modules=lambda m: m.name == "Dense_1")
    assert list(by_predicate) == ["Dense_1"]


def test_train_mode_with_noise_rng_and_mutable_state():
    model, x, variables = _setup()
    run = jax.jit(
        lambda v, x, k: activation_statistics(
            model.apply, v, x, train=True, mutable=["batch_stats"], rngs={"noise": k}, modules=(nn.Dense,)
        )
    )
    s1, s2 = run(variables, x, jax.random.key(3)), run(variables, x, jax.random.key(4))
    # Input of Dense_1 follows a train-mode BN then relu: no noise, identical for both keys.
    np.testing.assert_array_equal(s1["Dense_1"].mean, s2["Dense_1"].mean)
    # Input of Dense_2 is the noisy BN's output: the noise (fresh per key) moves its statistics.
    assert not np.allclose(s1["Dense_2"].mean, s2["Dense_2"].mean)


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3, name="shared")
        conv = nn.Conv(3, (3, 3), name="conv")
        y = conv(x)
        return dense(dense(y))


def test_repeated_calls_and_conv_layout():
    model = _Shared()
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    variables = model.init(jax.random.key(1), x)
    got = capture_inputs(model.apply, variables, x)
    assert list(got) == ["conv", "shared", "shared#1"]
    stats = activation_statistics(model.apply, variables, x)
    y = np.asarray(got["shared"], np.float64)
    np.testing.assert_allclose(stats["shared"].mean, y.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["shared#1"].std, np.asarray(got["shared#1"]).std((0, 1, 2)), rtol=1e-4)
    assert module_call_order(model.apply, variables, x) == ("conv", "shared")


def test_bad_options_raise():
    model, x, variables = _setup()
    with pytest.raises(ValueError, match="bins"):
        activation_statistics(model.apply, variables, x, train=False, bins=0)
    with pytest.raises(ValueError, match="value_range"):
        activation_statistics(model.apply, variables, x, train=False, value_range=(1.0, 1.0))
    with pytest.raises(TypeError, match="modules"):
        capture_inputs(model.apply, variables, x, train=False, modules=(int,))
    with pytest.raises(ValueError, match="collection"):
        module_call_order(model.apply, variables, x, train=False, collection="cache")
