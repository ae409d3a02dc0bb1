"""PyTorch interop against float64 NumPy re-implementations of PyTorch's documented BatchNorm formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.torch_interop import flax_momentum, from_torch, to_torch

EPS = 1e-5


def torch_bn(x, state, *, training, momentum, eps=EPS):
    """PyTorch's F.batch_norm + running-stat update (torch.nn.BatchNorm docs), float64, channels on axis 1."""
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = -1
    w = np.asarray(state.get("weight", np.ones(x.shape[1])), np.float64).reshape(shape)
    b = np.asarray(state.get("bias", np.zeros(x.shape[1])), np.float64).reshape(shape)
    rm = np.asarray(state["running_mean"], np.float64)
    rv = np.asarray(state["running_var"], np.float64)
    new = dict(state)
    if training:
        n = x.size // x.shape[1]
        mean, var = x.mean(axes), x.var(axes)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w + b
        tracked = int(state["num_batches_tracked"]) + 1
        f = 1.0 / tracked if momentum is None else momentum
        new["running_mean"] = (1 - f) * rm + f * mean
        new["running_var"] = (1 - f) * rv + f * var * n / (n - 1)
        new["num_batches_tracked"] = np.asarray(tracked, np.int64)
    else:
        y = (x - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + eps) * w + b
    return y, new


def _state(c, seed, tracked=3):
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "bias": rng.normal(size=c).astype(np.float32),
        "running_mean": rng.normal(size=c).astype(np.float32),
        "running_var": rng.uniform(0.5, 3.0, c).astype(np.float32),
        "num_batches_tracked": np.asarray(tracked, np.int64),
    }


SHAPES = [(6, 3), (4, 3, 5, 2)]  # BatchNorm1d (N, C) and BatchNorm2d NCHW


def _run(variables, x, *, train, momentum, convention):
    bn = bnjax.BatchNorm(axis=1, momentum=momentum, epsilon=EPS, convention=convention)
    y, upd = bn.apply(variables, jnp.asarray(x), use_running_average=not train, mutable=["batch_stats"])
    return np.asarray(y), upd["batch_stats"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("tracked", [0, 3])
def test_torch_convention_matches_pytorch_formulas(shape, momentum, tracked):
    state = _state(shape[1], 0, tracked)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 2 + 1
    variables = from_torch(state, convention="torch")
    for train in (False, True):
        y, stats = _run(variables, x, train=train, momentum=momentum, convention="torch")
        y_ref, new_ref = torch_bn(x, state, training=train, momentum=momentum)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        got = to_torch(variables["params"], stats)
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(got[key], new_ref[key], rtol=1e-5, atol=1e-6)
        assert int(got["num_batches_tracked"]) == int(new_ref["num_batches_tracked"])


@pytest.mark.parametrize("shape", SHAPES)
def test_flax_convention_same_eval_and_documented_update(shape):
    state = _state(shape[1], 2)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    variables = from_torch(state, convention="flax")
    assert "num_batches_tracked" not in variables["batch_stats"]
    mom = flax_momentum(0.1)
    y, _ = _run(variables, x, train=False, momentum=mom, convention="flax")
    np.testing.assert_allclose(y, torch_bn(x, state, training=False, momentum=0.1)[0], rtol=1e-5, atol=1e-5)
    _, stats = _run(variables, x, train=True, momentum=mom, convention="flax")
    _, ref = torch_bn(x, state, training=True, momentum=0.1)
    np.testing.assert_allclose(stats["mean"], ref["running_mean"], rtol=1e-5, atol=1e-6)
    # Flax feeds the biased variance to the running average: PyTorch's update with var * (n - 1) / n.
    var_b = np.asarray(x, np.float64).var(tuple(i for i in range(x.ndim) if i != 1))
    np.testing.assert_allclose(stats["var"], 0.9 * state["running_var"] + 0.1 * var_b, rtol=1e-5)
    assert not np.allclose(stats["var"], ref["running_var"], rtol=1e-3)


def test_round_trip_and_affine_false():
    state = _state(4, 5, tracked=7)
    back = to_torch(**from_torch(state))
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
        assert back[k].dtype == state[k].dtype
    plain = {k: state[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
    variables = from_torch(plain)
    assert variables["params"] == {}
    bn = bnjax.BatchNorm(use_running_average=True, use_scale=False, use_bias=False, convention="torch")
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    y = bn.apply(variables, x)
    np.testing.assert_allclose(y, torch_bn(x, plain, training=False, momentum=0.1)[0], rtol=1e-5, atol=1e-5)
    assert set(to_torch(**variables)) == set(plain)
    flax_vars = from_torch(state, convention="flax")
    assert int(to_torch(**flax_vars, num_batches_tracked=7)["num_batches_tracked"]) == 7


def test_momentum_mapping_and_errors():
    assert flax_momentum(0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="cumulative"):
        flax_momentum(None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flax_momentum(1.5)
    state = _state(3, 0)
    with pytest.raises(ValueError, match="track_running_stats"):
        from_torch({"weight": state["weight"], "bias": state["bias"]})
    with pytest.raises(ValueError, match="both weight and bias"):
        from_torch({**{k: state[k] for k in ("running_mean", "running_var")}, "weight": state["weight"]})
    with pytest.raises(ValueError, match="shape"):
        from_torch({**state, "running_var": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="convention"):
        from_torch(state, convention="jax")


def test_jit_train_step_counts_batches():
    state = _state(2, 4, tracked=0)
    variables = from_torch(state)
    bn = bnjax.BatchNorm(axis=1, momentum=None, convention="torch")
    step = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])[1])
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=(5, 2)).astype(np.float32) + i for i in range(3)]
    ref = state
    for x in xs:
        variables = {"params": variables["params"], "batch_stats": step(variables, x)["batch_stats"]}
        ref = torch_bn(x, ref, training=True, momentum=None)[1]
    got = to_torch(**variables)
    np.testing.assert_allclose(got["running_mean"], ref["running_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["running_var"], ref["running_var"], rtol=1e-5)
    # Cumulative average of 3 batches: equal weights 1/3, independent of the loaded initial statistics.
    np.testing.assert_allclose(got["running_mean"], np.mean([x.mean(0) for x in xs], 0), rtol=1e-5, atol=1e-6)
    assert int(got["num_batches_tracked"]) == 3
