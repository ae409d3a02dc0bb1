"""`bnjax.BatchNorm` is a drop-in for `flax.linen.BatchNorm(use_fast_variance=False)`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


class CNN(nn.Module):
    """A small model with BN layers in several layouts; `norm` is the BatchNorm class to use."""

    norm: type
    bn_kwargs: dict

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.norm, use_running_average=not train, **self.bn_kwargs)
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(norm()(x))
        x = nn.Conv(5, (3,), padding="VALID")(x.reshape(x.shape[0], -1, x.shape[-1]))
        x = jnp.tanh(norm()(x))
        x = nn.Dense(6)(x.reshape(x.shape[0], -1))
        return norm()(x)


CONFIGS = [
    dict(),
    dict(momentum=0.9, epsilon=1e-3),
    dict(use_bias=False),
    dict(use_scale=False),
    dict(momentum=0.5, use_bias=False, use_scale=False),
    dict(param_dtype=jnp.float32, dtype=jnp.float32),
    dict(scale_init=nn.initializers.constant(2.0), bias_init=nn.initializers.constant(0.5)),
]


FlaxBN = functools.partial(nn.BatchNorm, use_fast_variance=False)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_flax_in_train_and_eval(kwargs, seed):
    x = jax.random.normal(jax.random.key(seed), (8, 6, 6, 3)) * 3.0 + 1.0
    ours = CNN(bnjax.BatchNorm, kwargs)
    theirs = CNN(FlaxBN, kwargs)
    v_ours = ours.init(jax.random.key(seed + 10), x, train=True)
    v_theirs = theirs.init(jax.random.key(seed + 10), x, train=True)
    # Same variables, shapes, dtypes and init values; init leaves running statistics untouched.
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), v_ours, v_theirs)
    jax.tree.map(lambda a, b: (a.dtype == b.dtype) or pytest.fail("dtype"), v_ours, v_theirs)
    for layer in v_ours["batch_stats"].values():
        np.testing.assert_array_equal(layer["mean"], 0.0)
        np.testing.assert_array_equal(layer["var"], 1.0)

    v = v_ours
    for step in range(3):  # a few train steps: outputs and running statistics agree every time
        xs = x * (1.0 + step) + step
        y_ours, upd_ours = ours.apply(v, xs, train=True, mutable=["batch_stats"])
        y_theirs, upd_theirs = theirs.apply(v, xs, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), upd_ours, upd_theirs)
        v = {**v, **upd_ours}
    np.testing.assert_allclose(ours.apply(v, x, train=False), theirs.apply(v, x, train=False), rtol=1e-4, atol=1e-4)


def test_checkpoints_interchangeable_both_ways():
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
    ours, theirs = CNN(bnjax.BatchNorm, {}), CNN(FlaxBN, {})
    v_theirs = theirs.init(jax.random.key(1), x, train=True)
    _, upd = theirs.apply(v_theirs, x, train=True, mutable=["batch_stats"])
    v_theirs = {**v_theirs, **upd}  # non-trivial running statistics
    np.testing.assert_allclose(
        ours.apply(v_theirs, x, train=False), theirs.apply(v_theirs, x, train=False), rtol=1e-5, atol=1e-5
    )
    v_ours = ours.init(jax.random.key(2), x, train=True)
    _, upd = ours.apply(v_ours, x * 2, train=True, mutable=["batch_stats"])
    v_ours = {**v_ours, **upd}
    np.testing.assert_allclose(
        theirs.apply(v_ours, x, train=False), ours.apply(v_ours, x, train=False), rtol=1e-5, atol=1e-5
    )


def test_call_signature_overrides_field_and_mask():
    x = jax.random.normal(jax.random.key(0), (6, 4))
    mask = jnp.array([True, True, True, False, False, True])[:, None]
    ours, theirs = bnjax.BatchNorm(), nn.BatchNorm(use_fast_variance=False)
    v = ours.init(jax.random.key(1), x, use_running_average=False)
    y, upd = ours.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    y_ref, upd_ref = theirs.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), upd, upd_ref)
    with pytest.raises(ValueError, match="use_running_average"):
        ours.apply(v, x)


def test_bfloat16_dtypes_follow_flax():
    x = (jax.random.normal(jax.random.key(0), (16, 4)) + 3.0).astype(jnp.bfloat16)
    for kwargs in (dict(), dict(dtype=jnp.bfloat16), dict(param_dtype=jnp.bfloat16)):
        ours = bnjax.BatchNorm(use_running_average=False, **kwargs)
        theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False, **kwargs)
        v = ours.init(jax.random.key(1), x)
        y, _ = ours.apply(v, x, mutable=["batch_stats"])
        y_ref, _ = theirs.apply(v, x, mutable=["batch_stats"])
        assert y.dtype == y_ref.dtype, kwargs
        np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=2e-2, atol=2e-2)


def test_torch_convention_keeps_num_batches_tracked():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    m = bnjax.BatchNorm(use_running_average=False, convention="torch", momentum=None)
    v = m.init(jax.random.key(1), x)
    assert int(v["batch_stats"]["num_batches_tracked"]) == 0
    for _ in range(3):
        _, upd = m.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
    assert int(v["batch_stats"]["num_batches_tracked"]) == 3
    # Cumulative average of the same batch three times: the batch's own (unbiased) statistics.
    np.testing.assert_allclose(v["batch_stats"]["mean"], np.mean(x, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], np.var(np.asarray(x, np.float64), 0, ddof=1), rtol=1e-5)


def test_module_errors_name_the_problem():
    with pytest.raises(ValueError, match="more than one element per feature"):
        bnjax.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="axis=3 is out of range"):
        bnjax.BatchNorm(use_running_average=False, axis=3).init(jax.random.key(0), jnp.ones((2, 3)))
