"""test_local_stats: eval mode normalized with the batch's own statistics, running statistics untouched."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.renorm import BatchRenorm

EPS = 1e-5


@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((2, 4, 5, 3), -1), ((4, 3, 5), 1)])
@pytest.mark.parametrize("convention", ["flax", "torch"])
def test_local_stats_in_eval_mode(shape, axis, convention):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
    bn = bnjax.BatchNorm(
        use_running_average=True, test_local_stats=True, axis=axis, convention=convention, momentum=0.9, epsilon=EPS
    )
    variables = bn.init(jax.random.key(0), x)
    c = shape[axis]
    variables["params"]["scale"] = jnp.linspace(0.5, 2.0, c)
    variables["batch_stats"]["mean"] = jnp.full((c,), 7.0)
    # No mutable collection needed; a mutable one comes back unchanged.
    y = bn.apply(variables, x)
    y2, upd = bn.apply(variables, x, mutable=["batch_stats"])
    for k in variables["batch_stats"]:
        np.testing.assert_array_equal(upd["batch_stats"][k], variables["batch_stats"][k])
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    xb = x.astype(np.float64)
    bshape = [1] * len(shape)
    bshape[axis] = c
    ref = (
        (xb - xb.mean(red, keepdims=True))
        / np.sqrt(xb.var(red, keepdims=True) + EPS)
        * np.linspace(0.5, 2.0, c).reshape(bshape)
    )
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, y2)
    # Without the option, eval mode uses the running statistics (mean 7): clearly different.
    y_run = bnjax.BatchNorm(use_running_average=True, axis=axis, convention=convention).apply(variables, x)
    assert np.max(np.abs(np.asarray(y_run) - ref)) > 1.0


def test_local_stats_with_train_mode_layers_elsewhere_and_renorm():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool, local: bool = False):
            x = bnjax.BatchNorm(use_running_average=not train, test_local_stats=local)(x)
            return BatchRenorm(use_running_average=not train, test_local_stats=local, r_max=1.5, d_max=0.5)(x)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)) + 4, jnp.float32)
    model = Net()
    variables = model.init(jax.random.key(0), x, train=False)
    train_out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    local_out = model.apply(variables, x, train=False, local=True)
    # Equal to the train-mode output (batch statistics) without any update.
    np.testing.assert_allclose(local_out, train_out, rtol=1e-6, atol=1e-6)
    _, upd = model.apply(variables, x, train=False, local=True, mutable=["batch_stats"])
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(variables["batch_stats"])):
        np.testing.assert_array_equal(a, b)
