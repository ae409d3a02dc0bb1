"""Failure behaviour of the statistics: non-finite batches leave the running statistics untouched (functional
core, linen, nnx, across devices, precise BN), the overflow guard of the moments, and empty batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.nnx
from bnjax.precise import precise_batch_stats
from reference import bn_forward


def _batch(bad_value, shape=(8, 3), bad=(0, 1), seed=0):
    """A float32 batch with one non-finite element; ``bad=(0, 1)`` also makes it the first row (the shift)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 2.0 + 1.0
    x[bad] = bad_value
    return x


STATE = bnjax.BatchNormState(jnp.array([0.5, -1.0, 2.0], jnp.float32), jnp.array([1.5, 0.7, 3.0], jnp.float32))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("bad", [(0, 1), (5, 1)], ids=["first-row", "later-row"])
@pytest.mark.parametrize("convention", ["flax", "torch"])
def test_nonfinite_feature_keeps_running_statistics(bad_value, bad, convention):
    x = _batch(bad_value, bad=bad)
    state = STATE._replace(count=jnp.array(3, jnp.int32), nonfinite=jnp.array(0, jnp.int32))
    momentum = 0.9 if convention == "flax" else 0.1
    step = jax.jit(lambda x, s: bnjax.batch_norm(x, state=s, train=True, momentum=momentum, convention=convention))
    y, new = step(x, state)
    y, new, state = np.asarray(y), jax.tree.map(np.asarray, new), jax.tree.map(np.asarray, state)
    # The bad feature: running statistics unchanged; its finite rows normalized with them (finite), and
    # only the bad element itself non-finite.
    np.testing.assert_array_equal(new.mean[1], state.mean[1])
    np.testing.assert_array_equal(new.var[1], state.var[1])
    clean = np.arange(8) != bad[0]
    ref = (x[clean, 1] - float(state.mean[1])) / np.sqrt(float(state.var[1]) + 1e-5)
    np.testing.assert_allclose(y[clean, 1], ref, rtol=1e-5, atol=1e-5)
    assert not np.isfinite(y[bad])
    # The other features: ordinary batch norm and update, against float64 NumPy.
    y_ref, mean, var, n = bn_forward(x[:, [0, 2]])
    np.testing.assert_allclose(y[:, [0, 2]], y_ref, rtol=1e-5, atol=1e-5)
    if convention == "flax":
        np.testing.assert_allclose(new.mean[[0, 2]], 0.9 * state.mean[[0, 2]] + 0.1 * mean, rtol=1e-5)
        np.testing.assert_allclose(new.var[[0, 2]], 0.9 * state.var[[0, 2]] + 0.1 * var, rtol=1e-5)
    else:
        np.testing.assert_allclose(new.var[[0, 2]], 0.9 * state.var[[0, 2]] + 0.1 * var * 8 / 7, rtol=1e-5)
    assert int(new.count) == 4  # some feature was updated
    assert int(new.nonfinite) == 1


def test_all_features_nonfinite_keeps_everything_and_counts():
    x = _batch(np.nan)
    x[3, :] = np.nan
    state = STATE._replace(count=jnp.array(3, jnp.int32), nonfinite=jnp.array(2, jnp.int32))
    _, new = bnjax.batch_norm(x, state=state, train=True, momentum=None, convention="torch")
    for a, b in zip(new[:2], state[:2]):
        np.testing.assert_array_equal(a, b)
    assert int(new.count) == 3 and int(new.nonfinite) == 3


def test_untracked_state_and_stateless_train():
    x = _batch(np.nan)
    _, new = bnjax.batch_norm(x, state=STATE, train=True)
    assert new.nonfinite is None and np.all(np.isfinite(new.mean)) and np.all(np.isfinite(new.var))
    y, _ = bnjax.batch_norm(x, train=True)  # no running statistics to fall back to: the feature is NaN
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))


def test_ghost_batches_guard_the_whole_feature():
    x = _batch(np.nan, shape=(8, 3), bad=(6, 2))
    _, new = bnjax.batch_norm(x, state=STATE, train=True, virtual_batch_size=4, momentum=0.5)
    np.testing.assert_array_equal(new.mean[2], STATE.mean[2])
    _, mean, _, _ = bn_forward(x[:, :2])
    np.testing.assert_allclose(new.mean[:2], 0.5 * np.asarray(STATE.mean[:2]) + 0.5 * mean, rtol=1e-5)


def test_guard_with_mask_ignores_nonfinite_padding():
    x = _batch(np.nan, bad=(7, 0))
    mask = (np.arange(8) < 7)[:, None]
    _, new = bnjax.batch_norm(x, state=STATE, train=True, mask=mask, momentum=0.0)
    np.testing.assert_allclose(new.mean, x[:7].astype(np.float64).mean(0), rtol=1e-5)


def test_linen_module_guard_and_counter():
    x = _batch(np.nan)
    plain = bnjax.BatchNorm(use_running_average=False, momentum=0.9)
    variables = plain.init(jax.random.key(0), x)
    assert set(variables["batch_stats"]) == {"mean", "var"}  # drop-in layout by default
    _, upd = plain.apply(variables, x, mutable=["batch_stats"])
    assert np.all(np.isfinite(upd["batch_stats"]["mean"])) and float(upd["batch_stats"]["mean"][1]) == 0.0
    tracked = bnjax.BatchNorm(use_running_average=False, momentum=0.9, track_nonfinite=True)
    variables = tracked.init(jax.random.key(0), x)
    assert int(variables["batch_stats"]["nonfinite_batches"]) == 0
    step = jax.jit(lambda v, x: tracked.apply(v, x, mutable=["batch_stats"])[1])
    for batch in (x, np.nan_to_num(x), x):
        variables = {**variables, **step(variables, batch)}
    assert int(variables["batch_stats"]["nonfinite_batches"]) == 2
    assert np.all(np.isfinite(variables["batch_stats"]["var"]))


def test_nnx_module_guard_and_counter():
    x = _batch(np.inf)
    model = bnjax.nnx.BatchNorm(3, momentum=0.9, track_nonfinite=True, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(model, x):
        return model(x)

    step(model, x)
    assert int(model.nonfinite_batches[...]) == 1
    assert float(model.mean[...][1]) == 0.0 and float(model.var[...][1]) == 1.0
    assert np.all(np.isfinite(model.mean[...]))
    assert bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0)).nonfinite_batches is None


def test_nonfinite_on_one_device_keeps_statistics_on_every_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
    x = _batch(np.nan, shape=(8, 3), bad=(5, 0))  # device 2 of 4 holds the NaN

    def local(x):
        _, new = bnjax.batch_norm(x, state=STATE, train=True, momentum=0.5, axis_name="d")
        return new.mean[None], new.var[None]

    f = jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P("d")))
    means, vars_ = jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("d"))))
    np.testing.assert_array_equal(np.asarray(means)[:, 0], np.full(4, STATE.mean[0]))
    np.testing.assert_array_equal(np.asarray(vars_)[:, 0], np.full(4, STATE.var[0]))
    _, mean, var, _ = bn_forward(x[:, 1:])
    expected = np.tile(0.5 * np.asarray(STATE.mean[1:]) + 0.5 * mean, (4, 1))
    np.testing.assert_allclose(np.asarray(means)[:, 1:], expected, rtol=1e-5)


@pytest.mark.parametrize("sync", ["gather", "allreduce"])
def test_nonfinite_on_one_device_leaves_the_other_elements_finite(sync):
    """The merged shift must not carry one device's NaN into every device's x - K*: the feature falls back to
    the running statistics and only the NaN element itself comes out NaN, as on one device."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
    x = _batch(np.nan, shape=(8, 3), bad=(5, 1))

    def local(x):
        return bnjax.batch_norm(x, state=STATE, train=True, axis_name="d", sync=sync)[0]

    f = jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    y = np.asarray(jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("d")))))
    single = np.asarray(bnjax.batch_norm(x, state=STATE, train=True)[0])
    assert np.isfinite(y).sum() == x.size - 1
    np.testing.assert_allclose(y, single, rtol=1e-5, atol=1e-6)
    pm = jax.pmap(lambda a: bnjax.batch_norm(a, state=STATE, train=True, axis_name="d", sync=sync)[0], "d")
    np.testing.assert_allclose(np.asarray(pm(x.reshape(4, 2, 3))).reshape(8, 3), single, rtol=1e-5, atol=1e-6)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return bnjax.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))


def test_precise_batch_stats_names_the_nonfinite_batch():
    model = _MLP()
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(4)]
    variables = model.init(jax.random.key(0), batches[0])
    batches[2][3, 1] = np.nan
    with pytest.raises(ValueError, match=r"'BatchNorm_0'.*1 of 4 batches, the first at index 2"):
        precise_batch_stats(lambda v, b: model.apply(v, b), variables, batches, progress=False)
    batches[2][3, 1] = 0.0
    stats = precise_batch_stats(lambda v, b: model.apply(v, b), variables, batches, progress=False)
    assert np.all(np.isfinite(stats["BatchNorm_0"]["var"]))


# Overflow guard: x - K beyond sqrt(float32 max) ~ 1.8e19 while count * var stays below float32 max.
def _overflowing(dtype):
    x = np.zeros((8, 3), np.float64)
    x[:, 0] = [1.2e19, -1.2e19, 0, 0, 0, 0, 0, 0]  # (x - K)^2 = 5.8e38 overflows; m2 = 2.9e38 does not
    x[:, 1] = 1e20 + np.arange(8) * 1e18  # the "around 1e20"
    x[:, 2] = np.linspace(-3e18, 3e18, 8)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_moments_do_not_overflow_where_the_variance_fits(dtype):
    x = _overflowing(dtype)
    x64 = np.asarray(x.astype(np.float32), np.float64)  # the values actually represented
    mom = bnjax.batch_moments(x)
    np.testing.assert_allclose(np.ravel(mom.mean), x64.mean(0), rtol=1e-6, atol=1e12)
    np.testing.assert_allclose(np.ravel(mom.var), x64.var(0), rtol=1e-5)
    y, new = jax.jit(lambda x: bnjax.batch_norm(x, state=bnjax.init_state((3,)), train=True, momentum=0.0))(x)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(y, np.float64), bn_forward(x64)[0], rtol=tol, atol=tol)
    np.testing.assert_allclose(new.var, x64.var(0), rtol=1e-5)


def test_overflow_guard_keeps_gradients_finite():
    # Exactness is out of reach here: d(1/sqrt(var))/dvar ~ var^-1.5 underflows float32 for var > ~1e25.
    x = jnp.asarray(_overflowing(np.float32))
    dy = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, train=True)[0] * dy))(x)
    assert np.all(np.isfinite(g))


def test_variance_beyond_float32_is_guarded_at_the_documented_bound():
    # count * var = 8 * 1.6e38 > 3.4e38: the statistics overflow, and the guard keeps the running ones.
    x = np.zeros((8, 1), np.float32)
    x[:4], x[4:] = 1.3e19 * 1.0, -1.3e19 * 1.0  # var = 1.69e38 fits float32, m2 = 1.35e39 does not
    _, new = bnjax.batch_norm(x, state=bnjax.init_state((1,), track_nonfinite=True), train=True)
    assert float(new.var[0]) == 1.0 and int(new.nonfinite) == 1
    x[:4], x[4:] = 6e18, -6e18  # m2 = 2.9e38 fits: exact
    _, new = bnjax.batch_norm(x, state=bnjax.init_state((1,), track_nonfinite=True), train=True, momentum=0.0)
    np.testing.assert_allclose(new.var, [3.6e37], rtol=1e-6)
    assert int(new.nonfinite) == 0


@pytest.mark.parametrize("shape,axis", [((0, 3), -1), ((4, 0, 3), -1), ((0, 3, 2, 2), 1)])
def test_empty_batch_is_a_clear_error_in_train_mode(shape, axis):
    with pytest.raises(ValueError, match=r"empty batch: the input of shape \(.*0.*\)"):
        bnjax.batch_norm(jnp.zeros(shape), train=True, axis=axis)
    with pytest.raises(ValueError, match="empty batch"):
        bnjax.BatchNorm(use_running_average=False, axis=axis).init(jax.random.key(0), jnp.zeros(shape))
    with pytest.raises(ValueError, match="empty batch"):
        bnjax.batch_norm(jnp.zeros(shape), train=True, axis=axis, virtual_batch_size=2)
    y, _ = bnjax.batch_norm(jnp.zeros(shape), state=bnjax.init_state((3,)), train=False, axis=axis)
    assert y.shape == shape  # eval mode has no batch statistics: an empty batch is fine
