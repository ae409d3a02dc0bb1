"""The functional core `bnjax.batch_norm` against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from reference import bn_forward, bn_grad_x, bn_stats, torch_running_update

LAYOUTS = [
    pytest.param((6, 5), -1, id="dense-NC"),
    pytest.param((4, 7, 3), -1, id="conv1d-NWC"),
    pytest.param((3, 4, 5, 2), -1, id="conv2d-NHWC"),
    pytest.param((3, 2, 4, 5), 1, id="conv2d-NCHW"),
    pytest.param((3, 4, 5, 2), (1, 3), id="two-feature-axes"),
    pytest.param((5, 3), 1, id="positive-axis"),
]


def _inputs(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
    axes = (axis,) if isinstance(axis, int) else axis
    fshape = tuple(shape[a] for a in axes)
    scale = (1.0 + 0.3 * rng.standard_normal(fshape)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(fshape)).astype(np.float32)
    return x, scale, bias, fshape


def test_reference_helpers_are_sensitive():
    x, scale, bias, _ = _inputs((6, 5), -1)
    y, mean, var, n = bn_forward(x, scale, bias)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-12)
    assert np.all(n == 6)
    # The gradient formula agrees with a central difference of the reference forward.
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(x.shape)
    g = bn_grad_x(x, dy, scale)
    x64 = x.astype(np.float64)
    e = np.zeros_like(x64)
    e[2, 3] = 1e-6
    fd = (np.sum(dy * bn_forward(x64 + e, scale)[0]) - np.sum(dy * bn_forward(x64 - e, scale)[0])) / 2e-6
    np.testing.assert_allclose(g[2, 3], fd, rtol=1e-6)
    with pytest.raises(AssertionError):  # and the comparison is tight enough to see a 0.1% error
        np.testing.assert_allclose(g[2, 3] * 1.001, fd, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("jit", [False, True])
def test_train_mode_matches_reference(shape, axis, jit):
    x, scale, bias, fshape = _inputs(shape, axis)
    state = bnjax.init_state(fshape)
    fn = lambda x, s, b, st: bnjax.batch_norm(x, s, b, st, train=True, axis=axis, momentum=0.9)
    if jit:
        fn = jax.jit(fn)
    y, new = fn(x, scale, bias, state)
    y_ref, mean, var, _ = bn_forward(x, scale, bias, axis)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.ravel(new.mean), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.ravel(new.var), 0.9 + 0.1 * var, rtol=1e-5)
    assert new.mean.shape == fshape and new.count is None


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_eval_mode_uses_running_statistics_and_keeps_state(shape, axis):
    x, scale, bias, fshape = _inputs(shape, axis)
    rng = np.random.default_rng(3)
    state = bnjax.BatchNormState(
        jnp.asarray(rng.standard_normal(fshape), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32),
    )
    y, new = bnjax.batch_norm(x, scale, bias, state, train=False, axis=axis)
    axes = (axis,) if isinstance(axis, int) else axis
    bshape = [1] * x.ndim
    for a, s in zip(sorted(a % x.ndim for a in axes), fshape):
        bshape[a] = s
    r = lambda a: np.asarray(a, np.float64).reshape(bshape)
    y_ref = (x - r(state.mean)) / np.sqrt(r(state.var) + 1e-5) * r(scale) + r(bias)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert new is state


def test_optional_scale_and_bias_and_stateless_train():
    x, _, _, _ = _inputs((8, 3), -1)
    y, new = bnjax.batch_norm(x, train=True)
    np.testing.assert_allclose(y, bn_forward(x)[0], rtol=1e-5, atol=1e-5)
    assert new is None


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
def test_mask_statistics_over_valid_elements(shape, axis):
    x, scale, bias, fshape = _inputs(shape, axis)
    rng = np.random.default_rng(5)
    mask = rng.uniform(size=shape) < 0.6
    mask.reshape(-1)[:3] = True  # keep at least a few valid elements
    y, new = bnjax.batch_norm(x, scale, bias, bnjax.init_state(fshape), train=True, axis=axis, mask=mask, momentum=0.0)
    y_ref, mean, var, _ = bn_forward(x, scale, bias, axis, mask=mask)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.ravel(new.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.ravel(new.var), var, rtol=1e-5)


def test_broadcast_mask_and_invalid_padding_values_do_not_leak():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    valid_rows = np.array([False, True, True, True, True, False])
    x[~valid_rows] = 1e6  # garbage in padding must not matter, even in the first row (the shift)
    mask = valid_rows[:, None, None]
    y, new = bnjax.batch_norm(x, state=bnjax.init_state((3,)), train=True, mask=mask, momentum=0.0)
    _, mean, var, _ = bn_forward(x[valid_rows])
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(new.var, var, rtol=1e-4)
    np.testing.assert_allclose(y[valid_rows], bn_forward(x[valid_rows])[0], rtol=1e-4, atol=1e-4)


def test_fully_masked_batch_keeps_state_and_stays_finite():
    x, scale, bias, fshape = _inputs((4, 3), -1)
    state = bnjax.BatchNormState(jnp.full(fshape, 0.5), jnp.full(fshape, 2.0))
    y, new = bnjax.batch_norm(x, scale, bias, state, train=True, mask=np.zeros((4, 3), bool))
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("mean_mag", [1e3, 1e4])
def test_stable_for_large_mean_small_std(mean_mag):
    rng = np.random.default_rng(0)
    x = (mean_mag + 1e-2 * rng.standard_normal((1024, 16))).astype(np.float32)
    y, _ = jax.jit(lambda x: bnjax.batch_norm(x, train=True))(x)
    y_ref = bn_forward(x)[0]  # float64 on the same float32 inputs
    err = np.max(np.abs(np.asarray(y, np.float64) - y_ref)) / np.max(np.abs(y_ref))
    assert err < 1e-5, err


def test_flax_fast_variance_is_wrong_where_bnjax_is_right():
    """Documents the reason for the shifted sums: E[x^2]-E[x]^2 breaks down at mean 1e3, std 1e-2."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    x = (1e3 + 1e-2 * rng.standard_normal((1024, 16))).astype(np.float32)
    y_ref = bn_forward(x)[0]
    bn = nn.BatchNorm(use_running_average=False)
    v = bn.init(jax.random.key(0), x)
    y_flax, _ = bn.apply(v, x, mutable=["batch_stats"])
    err_flax = np.max(np.abs(y_flax - y_ref)) / np.max(np.abs(y_ref))
    assert err_flax > 0.1 or not np.all(np.isfinite(y_flax))


@pytest.mark.parametrize("in_dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_accumulates_in_float32(in_dtype):
    rng = np.random.default_rng(1)
    x = jnp.asarray(100.0 + rng.standard_normal((512, 8)), in_dtype)
    x_exact = np.asarray(x.astype(jnp.float32), np.float64)
    scale = jnp.ones((8,), jnp.float32)
    bias = jnp.zeros((8,), jnp.float32)
    y, new = bnjax.batch_norm(x, scale, bias, bnjax.init_state((8,)), train=True, momentum=0.0)
    assert y.dtype == jnp.float32  # promoted with the float32 parameters, as in Flax
    np.testing.assert_allclose(y, bn_forward(x_exact)[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new.var, x_exact.var(0), rtol=1e-4)
    y16, _ = bnjax.batch_norm(x, scale, bias, train=True, dtype=in_dtype)
    assert y16.dtype == in_dtype
    y_noparams, _ = bnjax.batch_norm(x, train=True)
    assert y_noparams.dtype == in_dtype


def _loss(x, scale, bias, w):
    y, _ = bnjax.batch_norm(x, scale, bias, train=True)
    return jnp.sum(w * y**2) + jnp.sum(jnp.sin(y))


def test_gradient_matches_reference_formula():
    x, scale, bias, _ = _inputs((5, 3, 4), -1)
    rng = np.random.default_rng(2)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    f = lambda x: jnp.sum(dy * bnjax.batch_norm(x, scale, bias, train=True)[0])
    np.testing.assert_allclose(jax.grad(f)(x), bn_grad_x(x, dy, scale), rtol=1e-4, atol=1e-5)
    # Forward mode agrees with reverse mode.
    t = rng.standard_normal(x.shape).astype(np.float32)
    _, jvp = jax.jvp(f, (x,), (t,))
    np.testing.assert_allclose(jvp, np.sum(bn_grad_x(x, dy, scale) * t), rtol=1e-4)


def test_second_derivatives_match_float64_finite_differences():
    x, scale, bias, _ = _inputs((4, 3), -1)
    w = np.random.default_rng(4).standard_normal(x.shape)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias, w)]
        hess = jax.hessian(_loss)(*args)  # (4, 3, 4, 3)
        grad = jax.jit(jax.grad(_loss))
        h = 1e-5
        fd = np.zeros(x.shape + x.shape)
        for idx in np.ndindex(*x.shape):
            e = np.zeros(x.shape)
            e[idx] = h
            fd[(...,) + idx] = (grad(args[0] + e, *args[1:]) - grad(args[0] - e, *args[1:])) / (2 * h)
        np.testing.assert_allclose(hess, fd, rtol=1e-5, atol=1e-6)
        # float32 forward-over-reverse HVP agrees with the float64 Hessian.
        v = np.random.default_rng(5).standard_normal(x.shape)
        hv64 = np.tensordot(np.asarray(hess), v, axes=2)
    args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias, w)]
    grad32 = lambda x: jax.grad(_loss)(x, *args32[1:])
    _, hv = jax.jvp(grad32, (args32[0],), (jnp.asarray(v, jnp.float32),))
    np.testing.assert_allclose(hv, hv64, rtol=1e-3, atol=1e-3 * np.max(np.abs(hv64)))


def test_composes_with_vmap_and_checkpoint():
    x, scale, bias, _ = _inputs((3, 6, 4), -1)
    per_example = jax.vmap(lambda xi: bnjax.batch_norm(xi, scale, bias, train=True)[0])(x)
    for i in range(3):
        np.testing.assert_allclose(per_example[i], bn_forward(x[i], scale, bias)[0], rtol=1e-4, atol=1e-5)
    f = lambda x: jnp.sum(bnjax.batch_norm(x, scale, bias, train=True)[0] ** 3)
    np.testing.assert_allclose(jax.grad(jax.checkpoint(f))(x), jax.grad(f)(x), rtol=1e-6, atol=1e-6)


def test_torch_convention_running_statistics():
    x, _, _, fshape = _inputs((6, 4), -1)
    old = bnjax.BatchNormState(jnp.full(fshape, 0.3), jnp.full(fshape, 1.7), jnp.array(4, jnp.int32))
    _, mean, var, n = bn_forward(x)
    for momentum in (0.1, None):
        _, new = bnjax.batch_norm(x, state=old, train=True, momentum=momentum, convention="torch")
        ref_mean, ref_var = torch_running_update(0.3, 1.7, mean, var, n, momentum, 4)
        np.testing.assert_allclose(new.mean, ref_mean, rtol=1e-5)
        np.testing.assert_allclose(new.var, ref_var, rtol=1e-5)
        assert int(new.count) == 5


def test_ghost_batches_normalize_each_sub_batch():
    x, scale, bias, fshape = _inputs((12, 3, 2), -1)
    y, new = bnjax.batch_norm(x, scale, bias, bnjax.init_state(fshape), train=True, virtual_batch_size=4, momentum=0.0)
    groups = [bn_forward(g, scale, bias) for g in np.split(x, 3)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in groups]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new.mean, np.mean([g[1] for g in groups], axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, np.mean([g[2] for g in groups], axis=0), rtol=1e-5)


def test_batch_moments_exposes_global_statistics():
    x, _, _, _ = _inputs((3, 5, 2), 1)
    mom = bnjax.batch_moments(x, axis=1)
    mean, var, n = bn_stats(x, 1)
    np.testing.assert_allclose(mom.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mom.var, var, rtol=1e-5)
    np.testing.assert_array_equal(mom.count, n)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=np.ones((1, 4), np.float32)), ValueError, r"more than one element per feature.*\(1, 4\)"),
        (dict(x=np.ones((4, 3), np.int32)), TypeError, r"x must be a floating-point array, got dtype int32"),
        (dict(axis=2), ValueError, r"axis=2 is out of range for an input of rank 2"),
        (dict(axis=(0, 1)), ValueError, r"leaves no axis to reduce"),
        (dict(scale=np.ones(5, np.float32)), ValueError, r"scale has shape \(5,\).*feature shape \(3,\)"),
        (dict(bias=np.ones((3, 1), np.float32)), ValueError, r"bias has shape \(3, 1\)"),
        (dict(mask=np.ones((4, 2), bool)), ValueError, r"mask of shape \(4, 2\) is not broadcastable.*\(4, 3\)"),
        (dict(mask=np.ones((2, 4, 3), bool)), ValueError, r"mask of shape \(2, 4, 3\) would broadcast"),
        (dict(mask=np.ones((4, 3), np.float32)), TypeError, r"mask must be a boolean array, got dtype float32"),
        (dict(virtual_batch_size=3), ValueError, r"virtual_batch_size=3 does not divide the batch.*4 entries"),
        (dict(momentum=None), ValueError, r"momentum=None \(cumulative average\) needs convention='torch'"),
        (dict(train=False), ValueError, r"train=False .* `state` is required"),
        (dict(convention="pytorch"), ValueError, r'convention must be "flax" or "torch"'),
    ],
)
def test_clear_errors_at_trace_time(kwargs, error, match):
    args = dict(x=np.ones((4, 3), np.float32), train=True)
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(error, match=match):
        jax.jit(lambda x: bnjax.batch_norm(x, **args)[0])(x)


def test_state_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"state.mean has shape \(4,\).*feature shape \(3,\)"):
        bnjax.batch_norm(np.ones((4, 3), np.float32), state=bnjax.init_state((4,)), train=True)


def test_ghost_batches_play_no_role_in_eval_mode():
    x, scale, bias, fshape = _inputs((10, 3), -1)  # 10 is not a multiple of 4: fine in eval mode
    state = bnjax.BatchNormState(jnp.full(fshape, 0.2), jnp.full(fshape, 1.5))
    y, _ = bnjax.batch_norm(x, scale, bias, state, train=False, virtual_batch_size=4)
    y_ref, _ = bnjax.batch_norm(x, scale, bias, state, train=False)
    np.testing.assert_array_equal(y, y_ref)
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide the batch"):
        bnjax.batch_norm(x, scale, bias, state, train=True, virtual_batch_size=4)
