"""Frozen BN for fine-tuning: frozen statistics (eval-mode BN) and scale/bias-only training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax.frozen import batch_norm_param_labels, train_only_batch_norm


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = nn.relu(bnjax.BatchNorm(use_running_average=not train, momentum=0.5)(x))
        x = nn.Dense(2)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)


def _setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 3)) * 2 + 1, jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    model = Net()
    return model, model.init(jax.random.key(0), x, train=False), x, y


def _fine_tune(model, variables, x, y, tx, *, bn_train, steps=3):
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    def loss(params, stats):
        v = {"params": params, "batch_stats": stats}
        if bn_train:
            out, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), upd["batch_stats"]
        return jnp.mean((model.apply(v, x, train=False) - y) ** 2), stats

    for _ in range(steps):
        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params, stats)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
    return params, stats


def _changed(a, b):
    return jax.tree_util.tree_map(lambda u, v: bool(np.any(np.asarray(u) != np.asarray(v))), a, b)


def test_labels_find_both_bn_kinds():
    _, variables, _, _ = _setup()
    labels = batch_norm_param_labels(variables)
    assert labels["BatchNorm_0"] == {"scale": "batch_norm", "bias": "batch_norm"}
    assert labels["BatchNorm_1"] == {"scale": "batch_norm", "bias": "batch_norm"}
    assert labels["Dense_0"] == {"kernel": "frozen", "bias": "frozen"}
    with pytest.raises(ValueError, match="batch_stats"):
        batch_norm_param_labels({"params": variables["params"]})


def test_no_bn_layer_found_is_an_error_not_an_all_frozen_model():
    """nnx.State objects (not nested dicts) used to label every parameter frozen: BN's scale and bias then
    got a zero update and nothing trained."""
    from flax import nnx

    import bnjax.nnx

    class M(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.bn = nnx.Linear(3, 4, rngs=rngs), bnjax.nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.lin(x))

    m = M(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no BN layer found.*not nnx.State objects.*State"):
        train_only_batch_norm(
            optax.sgd(0.1), {"params": nnx.state(m, nnx.Param), "batch_stats": nnx.state(m, nnx.BatchStat)}
        )
    _, variables, _, _ = _setup()
    with pytest.raises(ValueError, match=r"no BN layer found"):
        batch_norm_param_labels({"params": variables["params"], "batch_stats": {}})
    labels = batch_norm_param_labels(bnjax.as_functional(m).variables)  # the documented NNX route still works
    assert labels["bn"] == {"scale": "batch_norm", "bias": "batch_norm"}


@pytest.mark.parametrize("bn_train", [False, True])
def test_only_scale_bias_train(bn_train):
    model, variables, x, y = _setup()
    tx = train_only_batch_norm(optax.adamw(1e-2, weight_decay=0.1), variables)
    params, stats = _fine_tune(model, variables, x, y, tx, bn_train=bn_train)
    changed = _changed(variables["params"], params)
    for layer in ("Dense_0", "Dense_1"):
        assert changed[layer] == {"kernel": False, "bias": False}
    for layer in ("BatchNorm_0", "BatchNorm_1"):
        assert changed[layer] == {"scale": True, "bias": True}
    # (a) + (b): eval-mode BN leaves the statistics exactly as they were; train-mode BN updates them.
    stats_changed = jax.tree_util.tree_leaves(_changed(variables["batch_stats"], stats))
    assert all(stats_changed) if bn_train else not any(stats_changed)


def test_frozen_statistics_train_all_params():
    model, variables, x, y = _setup()
    params, stats = _fine_tune(model, variables, x, y, optax.sgd(1e-1), bn_train=False)
    assert all(jax.tree_util.tree_leaves(_changed(variables["params"], params)))
    assert not any(jax.tree_util.tree_leaves(_changed(variables["batch_stats"], stats)))


def test_optax_masked_alone_is_not_a_freeze():
    """Why train_only_batch_norm uses multi_transform: optax.masked passes raw gradients through."""
    model, variables, x, y = _setup()
    mask = jax.tree_util.tree_map(lambda s: s == "batch_norm", batch_norm_param_labels(variables))
    params, _ = _fine_tune(model, variables, x, y, optax.masked(optax.sgd(1e-1), mask), bn_train=False)
    assert _changed(variables["params"], params)["Dense_0"]["kernel"]
