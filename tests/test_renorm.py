"""Batch renormalization against a float64 NumPy reference; r_max=1, d_max=0 is batch norm; r, d are constants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.renorm import BatchRenorm, batch_renorm, paper_schedule

EPS = 1e-3


def renorm_ref(x, scale, bias, mean, var, *, r_max, d_max, momentum, mask=None):
    """Ioffe 2017, Algorithm 1 in float64 (running variance kept as a variance), features on the last axis."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    valid = flat if mask is None else flat[np.asarray(mask).reshape(-1)]
    mu_b, var_b = valid.mean(0), valid.var(0)
    sigma_b, sigma = np.sqrt(var_b + EPS), np.sqrt(np.asarray(var, np.float64) + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
    y = scale * ((x - mu_b) / sigma_b * r + d) + bias
    return y, momentum * mean + (1 - momentum) * mu_b, momentum * var + (1 - momentum) * var_b


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.normal(size=shape) * rng.uniform(0.2, 4.0, c) + rng.normal(size=c) * 3).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    state = bnjax.BatchNormState(
        jnp.asarray(rng.normal(size=c), jnp.float32), jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    )
    return x, scale, bias, state


@pytest.mark.parametrize("shape", [(16, 6), (3, 4, 5, 6)])
@pytest.mark.parametrize("r_max,d_max", [(1.5, 0.5), (3.0, 5.0), (1e6, 1e6)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy_reference(shape, r_max, d_max, masked):
    x, scale, bias, state = _inputs(shape)
    mask = None
    if masked:
        mask = np.random.default_rng(1).uniform(size=shape[:-1] + (1,)) < 0.7
    y, new = jax.jit(
        lambda x, m: batch_renorm(
            x, scale, bias, state, train=True, r_max=r_max, d_max=d_max, momentum=0.9, epsilon=EPS, mask=m
        )
    )(x, mask)
    y_ref, mean_ref, var_ref = renorm_ref(
        x, scale, bias, np.asarray(state.mean), np.asarray(state.var), r_max=r_max, d_max=d_max, momentum=0.9, mask=mask
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, var_ref, rtol=1e-5)
    # Eval mode is plain eval-mode batch norm.
    y_eval, same = batch_renorm(x, scale, bias, state, train=False, epsilon=EPS)
    eval_ref = (x - np.asarray(state.mean)) / np.sqrt(np.asarray(state.var) + EPS) * scale + bias
    np.testing.assert_allclose(y_eval, eval_ref, rtol=1e-5, atol=1e-5)
    assert same is state


def test_clipping_is_active_in_reference_cases():
    """Guards the test above: the cases differ from each other and from plain batch norm."""
    x, scale, bias, state = _inputs((16, 6))
    args = (x, scale, bias, np.asarray(state.mean), np.asarray(state.var))
    clipped = renorm_ref(*args, r_max=1.5, d_max=0.5, momentum=0.9)[0]
    free = renorm_ref(*args, r_max=1e6, d_max=1e6, momentum=0.9)[0]
    plain = renorm_ref(*args, r_max=1.0, d_max=0.0, momentum=0.9)[0]
    assert np.any(np.abs(clipped - free) > 1e-2)
    assert np.any(np.abs(clipped - plain) > 1e-2)


def _loss(fn, w):
    return lambda x, s, b: jnp.sum(fn(x, s, b) * w)


def test_unit_bounds_equal_batch_norm_outputs_and_gradients():
    x, scale, bias, state = _inputs((8, 2, 5))
    w = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    renorm = lambda x, s, b: batch_renorm(x, s, b, state, train=True, r_max=1.0, d_max=0.0, epsilon=EPS)  # noqa
    plain = lambda x, s, b: bnjax.batch_norm(x, s, b, state, train=True, epsilon=EPS)  # noqa: E731
    (y1, st1), (y2, st2) = renorm(x, scale, bias), plain(x, scale, bias)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st1.mean, st2.mean, rtol=1e-6)
    np.testing.assert_allclose(st1.var, st2.var, rtol=1e-6)
    g1 = jax.grad(_loss(lambda *a: renorm(*a)[0], w), argnums=(0, 1, 2))(x, scale, bias)
    g2 = jax.grad(_loss(lambda *a: plain(*a)[0], w), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_treat_r_and_d_as_constants():
    x, scale, bias, state = _inputs((10, 4), seed=4)
    mean, var = np.asarray(state.mean), np.asarray(state.var)
    w = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
    r_max, d_max = 2.0, 1.0
    xb = np.asarray(x, np.float64)
    r = np.clip(np.sqrt(xb.var(0) + EPS) / np.sqrt(var + EPS), 1 / r_max, r_max)
    d = np.clip((xb.mean(0) - mean) / np.sqrt(var + EPS), -d_max, d_max)

    def with_r_d(x, s, b, r, d):  # independent: plain jnp mean/var, r and d given
        xhat = (x - jnp.mean(x, 0, keepdims=True)) / jnp.sqrt(jnp.var(x, 0, keepdims=True) + EPS)
        return s[None] * (xhat * r.reshape(1, -1) + d.reshape(1, -1)) + b[None]

    def through_r_d(x, s, b):  # the same without stop_gradient: what the paper rules out
        sig_b, sig = jnp.sqrt(jnp.var(x, 0) + EPS), jnp.sqrt(jnp.asarray(var) + EPS)
        return with_r_d(
            x, s, b, jnp.clip(sig_b / sig, 1 / r_max, r_max), jnp.clip((jnp.mean(x, 0) - mean) / sig, -d_max, d_max)
        )

    r32, d32 = jnp.asarray(r, jnp.float32), jnp.asarray(d, jnp.float32)
    got = jax.grad(
        _loss(lambda x, s, b: batch_renorm(x, s, b, state, train=True, r_max=r_max, d_max=d_max, epsilon=EPS)[0], w),
        argnums=(0, 1),
    )(x, scale, bias)
    ref = jax.grad(_loss(lambda x, s, b: with_r_d(x, s, b, r32, d32), w), argnums=(0, 1))(x, scale, bias)
    wrong = jax.grad(_loss(through_r_d, w), argnums=0)(x, scale, bias)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(np.asarray(wrong) - np.asarray(ref[0]))) > 1e-2


@pytest.mark.parametrize("sync", ["gather", "allreduce"])
def test_cross_device_statistics_equal_global_batch(sync):
    x, scale, bias, state = _inputs((12, 3), seed=6)
    fn = lambda x: batch_renorm(  # noqa: E731
        x, scale, bias, state, train=True, r_max=1.5, d_max=0.5, axis_name="d", sync=sync
    )
    # The updated statistics are the same on every device and come out unmapped.
    y_dev, st = jax.vmap(fn, axis_name="d", out_axes=(0, None))(x.reshape(4, 3, 3))
    y, st_ref = batch_renorm(x, scale, bias, state, train=True, r_max=1.5, d_max=0.5)
    np.testing.assert_allclose(y_dev.reshape(12, 3), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.mean, st_ref.mean, rtol=1e-6)
    np.testing.assert_allclose(st.var, st_ref.var, rtol=1e-6)


def test_module_schedule_and_call_time_bounds():
    r_sched, d_sched = paper_schedule()
    np.testing.assert_allclose(
        [r_sched(0), r_sched(5000), r_sched(40000), d_sched(25000), d_sched(4000)], [1.0, 1.0, 3.0, 5.0, 0.0]
    )
    x, _, _, _ = _inputs((8, 3), seed=7)
    model = BatchRenorm(momentum=0.9, epsilon=EPS, r_max=r_sched, d_max=d_sched)
    variables = model.init(jax.random.key(0), x, use_running_average=False)
    assert int(variables["batch_stats"]["step"]) == 0
    variables["batch_stats"]["mean"] = jnp.full((3,), 5.0)
    # Step 0 of the paper schedule: r_max = 1, d_max = 0, i.e. plain batch norm.
    y, upd = model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    bn_vars = {"params": variables["params"], "batch_stats": {k: variables["batch_stats"][k] for k in ("mean", "var")}}
    y_bn, upd_bn = bnjax.BatchNorm(momentum=0.9, epsilon=EPS).apply(
        bn_vars, x, use_running_average=False, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, y_bn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], upd_bn["batch_stats"]["mean"], rtol=1e-6)
    assert int(upd["batch_stats"]["step"]) == 1
    # Bounds given at call time win over the schedule; they match the functional form.
    y2, _ = model.apply(variables, x, use_running_average=False, r_max=1.5, d_max=0.5, mutable=["batch_stats"])
    state = bnjax.BatchNormState(variables["batch_stats"]["mean"], variables["batch_stats"]["var"])
    y2_ref, _ = batch_renorm(
        x,
        variables["params"]["scale"],
        variables["params"]["bias"],
        state,
        train=True,
        r_max=1.5,
        d_max=0.5,
        epsilon=EPS,
        momentum=0.9,
    )
    np.testing.assert_allclose(y2, y2_ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y2, y, atol=1e-2)
    # Eval mode does not advance the schedule.
    _, upd = model.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["step"]) == 0


def test_errors():
    x, scale, bias, state = _inputs((4, 3))
    with pytest.raises(ValueError, match="r_max"):
        batch_renorm(x, scale, bias, state, train=True, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        batch_renorm(x, scale, bias, state, train=True, d_max=-1.0)
    with pytest.raises(ValueError, match="state"):
        batch_renorm(x, scale, bias, None, train=True)
    with pytest.raises(ValueError, match="shape"):
        batch_renorm(x, scale[:2], bias, state, train=True)
    with pytest.raises(ValueError, match="momentum=None"):
        batch_renorm(x, scale, bias, state, train=True, momentum=None)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        BatchRenorm(virtual_batch_size=2).init(jax.random.key(0), x, use_running_average=False)
