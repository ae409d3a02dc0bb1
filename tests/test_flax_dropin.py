"""bnjax as a literal drop-in for Flax's BatchNorm: Flax's own BatchNorm test cases, with bnjax swapped in.

Re-expressed (not copied) from Flax's suite, same scenario and assertions, plus a comparison with Flax's own
module where that is what the case checks:

* ``tests/linen/linen_test.py``: ``test_batch_norm`` (with and without mask), ``test_batch_norm_complex``
  (with and without mask), ``test_batch_norm_multi_init``.
* ``tests/nnx/nn/normalization_test.py``: ``test_nnx_linen_batchnorm_equivalence`` (dtype x param_dtype x
  use_fast_variance x mask, 16 cases): bnjax's NNX module matches bnjax's linen module bit for bit.

Then what the swap needs: every field and call argument of ``flax.linen.BatchNorm`` / ``flax.nnx.BatchNorm`` is
accepted, the no-op ones are no-ops, and complex inputs follow Flax (complex mean, real variance
``E|x - mean|^2``) in the functional core, the modules and the cross-device merge, against complex128 NumPy.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import bnjax
import bnjax.nnx

TOL = {jnp.float32: 1e-5, jnp.float16: 1e-2}


# -- linen_test.py -------------------------------------------------------------------------------------------


def _masked_input(dtype, test_mask):
    """Flax's scenario: (4, 3, 2) normal input; with a mask, masked rows are NaN (they must not leak)."""
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key1, (4, 3, 2), dtype=dtype)
    m = None
    if test_mask:
        m = jax.random.randint(key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32).astype(jnp.bool_)
        x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    return x, m, key3


def _ref_stats(x, m):
    """Float64/complex128 NumPy mean and biased variance E|x - mean|^2 over axes (0, 1), valid elements only."""
    xd = np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
    w = np.ones(xd.shape) if m is None else np.broadcast_to(np.asarray(m), xd.shape).astype(np.float64)
    xd = np.where(w > 0, xd, 0)
    n = w.sum((0, 1))
    mean = (w * xd).sum((0, 1)) / n
    var = (w * np.abs(xd - mean) ** 2).sum((0, 1)) / n
    return mean, var


@pytest.mark.parametrize("test_mask", [True, False])
@pytest.mark.parametrize("complex_input", [False, True], ids=["test_batch_norm", "test_batch_norm_complex"])
def test_batch_norm(test_mask, complex_input):
    dtype = jnp.complex64 if complex_input else jnp.float32
    x, m, key = _masked_input(dtype, test_mask)
    kwargs = dict(momentum=0.9, use_running_average=False, dtype=jnp.complex64 if complex_input else None)
    model = bnjax.BatchNorm(**kwargs)
    y, variables = model.init_with_output(key, x, mask=m)

    # Flax's assertions: normalized output, then one EMA step from (0, 1) with momentum 0.9.
    mean, var = y.mean((0, 1), where=m), y.var((0, 1), where=m)
    np.testing.assert_allclose(mean, np.zeros(2), atol=1e-4)
    np.testing.assert_allclose(var, np.ones(2), rtol=1e-4)
    if complex_input:
        assert mean.dtype == jnp.complex64
    _, updated = model.apply(variables, x, mutable=["batch_stats"], mask=m)
    ema = updated["batch_stats"]
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)

    # Running statistics as Flax keeps them: complex mean, real variance; and equal to an exact reference.
    ref_mean, ref_var = _ref_stats(x, m)
    assert ema["mean"].dtype == dtype and ema["var"].dtype == jnp.float32
    np.testing.assert_allclose(ema["mean"], 0.1 * ref_mean, atol=1e-6)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * ref_var, rtol=1e-6)

    # And the same as Flax's own module, outputs (valid rows) and running statistics.
    flax_model = nn.BatchNorm(**kwargs)
    y_flax, flax_vars = flax_model.init_with_output(key, x, mask=m)
    assert jax.tree.map(jnp.shape, flax_vars) == jax.tree.map(jnp.shape, variables)
    valid = np.ones(x.shape, bool) if m is None else np.broadcast_to(np.asarray(m), x.shape)
    assert y.dtype == y_flax.dtype
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_flax)[valid], atol=1e-5)
    _, flax_updated = flax_model.apply(flax_vars, x, mutable=["batch_stats"], mask=m)
    for k in ("mean", "var"):
        assert ema[k].dtype == flax_updated["batch_stats"][k].dtype
        np.testing.assert_allclose(ema[k], flax_updated["batch_stats"][k], atol=1e-6)


def test_batch_norm_multi_init():
    # The axis name is unbound during init, and a module called twice in init shares its variables.
    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = bnjax.BatchNorm(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    (y1, y2), variables = Foo().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)
    assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {"norm": {"mean": (4,), "var": (4,)}}


# -- nnx/nn/normalization_test.py ----------------------------------------------------------------------------


def _identity_promote(args, **kwargs):
    return args


class _NNXModel(nnx.Module):
    def __init__(self, dtype, param_dtype, use_fast_variance, rngs):
        self.norm_layer = bnjax.nnx.BatchNorm(
            5,
            use_running_average=False,
            dtype=dtype,
            param_dtype=param_dtype,
            use_fast_variance=use_fast_variance,
            promote_dtype=_identity_promote,  # Flax's test pins linen's behaviour this way
            rngs=rngs,
        )
        self.linear = nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, mask=None):
        return self.linear(self.norm_layer(x, mask=mask))


class _LinenModel(nn.Module):
    norm: type
    dtype: object = None
    param_dtype: object = jnp.float32
    use_fast_variance: bool = True

    def setup(self):
        self.norm_layer = self.norm(
            use_running_average=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_fast_variance=self.use_fast_variance,
        )
        self.linear = nn.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, *, mask=None):
        return self.linear(self.norm_layer(x, mask=mask))


@pytest.mark.parametrize("mask", [None, np.array([True, False, True, False, True])], ids=["nomask", "mask"])
@pytest.mark.parametrize("use_fast_variance", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_nnx_linen_batchnorm_equivalence(dtype, param_dtype, use_fast_variance, mask):
    x = jax.random.normal(jax.random.key(0), (10, 5))
    linen_model = _LinenModel(bnjax.BatchNorm, dtype, param_dtype, use_fast_variance)
    initial = linen_model.init(jax.random.key(1), x)
    linen_out, updates = linen_model.apply(initial, x, mask=mask, mutable=["batch_stats"])
    variables = {**initial, **updates}

    nnx_model = _NNXModel(dtype, param_dtype, use_fast_variance, nnx.Rngs(42))
    nnx_model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    nnx_model.linear.bias[...] = variables["params"]["linear"]["bias"]
    nnx_out = nnx_model(x, mask=mask)

    # Flax's assertions: bit-identical outputs, parameters and running statistics.
    np.testing.assert_array_equal(linen_out, nnx_out)
    bn, stats = variables["params"]["norm_layer"], variables["batch_stats"]["norm_layer"]
    np.testing.assert_array_equal(bn["scale"], nnx_model.norm_layer.scale[...])
    np.testing.assert_array_equal(bn["bias"], nnx_model.norm_layer.bias[...])
    np.testing.assert_array_equal(stats["mean"], nnx_model.norm_layer.mean[...])
    np.testing.assert_array_equal(stats["var"], nnx_model.norm_layer.var[...])

    # Against Flax's own linen module on the same variables. The mask here masks whole features; Flax makes
    # their statistics (and so every output) NaN, bnjax keeps their running statistics (documented difference).
    flax_model = _LinenModel(nn.BatchNorm, dtype, param_dtype, False)
    flax_out, flax_updates = flax_model.apply(initial, x, mask=mask, mutable=["batch_stats"])
    flax_stats = flax_updates["batch_stats"]["norm_layer"]
    tol = TOL[dtype]
    valid = np.ones(5, bool) if mask is None else mask
    for k in ("mean", "var"):
        np.testing.assert_allclose(stats[k][valid], flax_stats[k][valid], rtol=1e-5, atol=1e-6)
    if mask is None:
        assert flax_out.dtype == linen_out.dtype
        np.testing.assert_allclose(
            np.asarray(linen_out, np.float32), np.asarray(flax_out, np.float32), rtol=tol, atol=tol
        )
    else:
        np.testing.assert_array_equal(stats["mean"][~valid], 0.0)
        np.testing.assert_array_equal(stats["var"][~valid], 1.0)
        assert np.all(np.isfinite(np.asarray(linen_out, np.float32)))


# -- every Flax field and argument is accepted ---------------------------------------------------------------


def test_linen_accepts_every_flax_field_and_call_argument():
    ours = {f.name for f in bnjax.BatchNorm.__dataclass_fields__.values()}
    theirs = {f.name for f in nn.BatchNorm.__dataclass_fields__.values()}
    assert theirs <= ours, f"missing Flax fields: {sorted(theirs - ours)}"
    assert list(inspect.signature(nn.BatchNorm.__call__).parameters) == list(
        inspect.signature(bnjax.BatchNorm.__call__).parameters
    )


def test_nnx_accepts_every_flax_argument():
    ours = inspect.signature(bnjax.nnx.BatchNorm.__init__).parameters
    theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
    missing = [name for name in theirs if name not in ours]
    assert not missing, f"missing Flax arguments: {missing}"
    for name, p in theirs.items():
        assert ours[name].kind == p.kind, name
    assert list(inspect.signature(nnx.BatchNorm.__call__).parameters) == list(
        inspect.signature(bnjax.nnx.BatchNorm.__call__).parameters
    )
    # Flax's attributes are there too (code reads e.g. ``layer.num_features`` or ``layer.use_fast_variance``).
    flax_layer = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    layer = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    for name in (
        "num_features",
        "use_running_average",
        "axis",
        "momentum",
        "epsilon",
        "dtype",
        "param_dtype",
        "use_bias",
        "use_scale",
        "axis_name",
        "axis_index_groups",
        "use_fast_variance",
    ):
        assert getattr(layer, name) == getattr(flax_layer, name), name


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_use_fast_variance_is_a_no_op_and_exact(offset):
    # Flax's fast variance E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std; bnjax is exact either way.
    x = jax.random.normal(jax.random.key(0), (16, 3)) + offset
    outs = []
    for fast in (True, False):
        model = bnjax.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=fast)
        variables = model.init(jax.random.key(1), x)
        outs.append(model.apply(variables, x, mutable=["batch_stats"]))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1]["batch_stats"]["var"], outs[1][1]["batch_stats"]["var"])
    ref_mean, ref_var = _ref_stats(x[:, None], None)
    np.testing.assert_allclose(outs[0][1]["batch_stats"]["var"], 0.9 + 0.1 * ref_var, rtol=1e-5)
    y_ref = (np.asarray(x, np.float64) - ref_mean) / np.sqrt(ref_var + 1e-5)
    np.testing.assert_allclose(outs[0][0], y_ref, atol=1e-4 if offset else 1e-5)
    if offset:  # the contrast: Flax's fast variance is off by O(1) here, so the check above has teeth
        flax_model = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=True)
        _, flax_upd = flax_model.apply(flax_model.init(jax.random.key(1), x), x, mutable=["batch_stats"])
        assert np.max(np.abs(flax_upd["batch_stats"]["var"] - (0.9 + 0.1 * ref_var))) > 0.05


@pytest.mark.parametrize("force_float32_reductions", [True, False])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_force_float32_reductions_keeps_flax_variable_dtypes(force_float32_reductions, param_dtype):
    x = jax.random.normal(jax.random.key(0), (8, 3))
    kwargs = dict(use_running_average=False, param_dtype=param_dtype, force_float32_reductions=force_float32_reductions)
    ours, theirs = bnjax.BatchNorm(**kwargs), nn.BatchNorm(use_fast_variance=False, **kwargs)
    v_ours, v_theirs = ours.init(jax.random.key(1), x), theirs.init(jax.random.key(1), x)
    dtypes = functools.partial(jax.tree.map, lambda a: a.dtype)
    assert dtypes(v_ours) == dtypes(v_theirs)
    y, upd = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_flax, upd_flax = theirs.apply(v_theirs, x, mutable=["batch_stats"])
    tol = 1e-5 if param_dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_flax, np.float32), atol=tol)
    assert upd["batch_stats"]["mean"].dtype == v_ours["batch_stats"]["mean"].dtype
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            np.asarray(upd["batch_stats"][k], np.float32),
            np.asarray(upd_flax["batch_stats"][k], np.float32),
            rtol=tol,
            atol=tol,
        )


@pytest.mark.parametrize("dtype", [None, jnp.float16])
def test_nnx_flax_default_promote_dtype(dtype):
    # With Flax's NNX default casting (x, statistics, scale, bias to one dtype first) bnjax follows Flax's NNX
    # module; without it (bnjax's default) it follows the linen modules.
    x = jax.random.normal(jax.random.key(0), (12, 4)) * 2.0 + 1.0
    ours = bnjax.nnx.BatchNorm(4, dtype=dtype, promote_dtype=nnx_dtypes.promote_dtype, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(4, dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0))
    tol = 1e-5 if dtype is None else 2e-3
    for train in (True, True, False):
        y, y_flax = ours(x, use_running_average=not train), theirs(x, use_running_average=not train)
        assert y.dtype == y_flax.dtype
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_flax, np.float32), rtol=tol, atol=tol)
    for k in ("mean", "var"):
        got, want = getattr(ours, k), getattr(theirs, k)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got[...], want[...], rtol=tol, atol=tol)


def test_nnx_promoted_bfloat16_running_statistics_keep_moving_as_in_flax():
    """With Flax's NNX casting to bfloat16 the running statistics update from their float32 values, as Flax's
    do; updated from the bfloat16 copy, the increments of a mean near 50 (bf16 spacing 0.25) rounded away and
    it stalled at 32."""
    x = (jnp.array([0.3, 50.0])[None] + 2.0 * jax.random.normal(jax.random.key(2), (512, 2))).astype(jnp.bfloat16)
    ours = bnjax.nnx.BatchNorm(2, dtype=jnp.bfloat16, promote_dtype=nnx_dtypes.promote_dtype, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    for _ in range(300):
        ours(x), theirs(x)
    assert ours.mean.dtype == jnp.float32
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5)
    assert float(ours.mean[...][1]) > 45.0  # 50 (1 - 0.99**300) = 47.5
    y, y_flax = ours(x, use_running_average=True), theirs(x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_flax, np.float32), rtol=2e-2, atol=2e-2)


def test_nnx_rng_keys_metadata_and_view_as_in_flax():
    init = nnx.initializers.normal(1.0)
    kwargs = dict(scale_init=init, bias_init=init, scale_metadata={"tag": "s"}, bias_metadata={"tag": 1})
    ours = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(7), **kwargs)
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(7), **kwargs)
    # One key each for scale and bias, drawn as Flax draws them.
    np.testing.assert_array_equal(ours.scale[...], theirs.scale[...])
    np.testing.assert_array_equal(ours.bias[...], theirs.bias[...])
    assert not np.array_equal(ours.scale[...], ours.bias[...])
    assert ours.scale.get_metadata()["tag"] == "s" and ours.bias.get_metadata()["tag"] == 1
    # nnx.view and train()/eval() switch the mode as they do for Flax's module.
    x = jax.random.normal(jax.random.key(0), (6, 3))
    ours.train()
    before = ours.mean[...]
    nnx.view(ours, use_running_average=True)(x)
    np.testing.assert_array_equal(ours.mean[...], before)
    ours(x)
    assert not np.array_equal(ours.mean[...], before)
    ours.eval()
    assert ours.use_running_average is True


# -- complex inputs -------------------------------------------------------------------------------------------


def _complex(key, shape, loc=0.0):
    re, im = jax.random.normal(key, (2, *shape))
    return (re + 1j * im + loc).astype(jnp.complex64)


def _ref_bn(x, feature_axis, mask=None, eps=1e-5):
    """complex128 NumPy: (y, mean, var) with the mean complex and the variance E|x - mean|^2."""
    xd = np.asarray(x, np.complex128)
    axes = tuple(i for i in range(xd.ndim) if i != feature_axis % xd.ndim)
    w = np.ones(xd.shape) if mask is None else np.broadcast_to(np.asarray(mask), xd.shape).astype(float)
    xz = np.where(w > 0, xd, 0)
    n = w.sum(axes, keepdims=True)
    mean = (w * xz).sum(axes, keepdims=True) / n
    var = (w * np.abs(xz - mean) ** 2).sum(axes, keepdims=True) / n
    return (xd - mean) / np.sqrt(var + eps), mean.reshape(-1), var.reshape(-1)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("feature_axis", [-1, 1])
def test_complex_functional_core(feature_axis, masked):
    x = _complex(jax.random.key(0), (6, 3, 5), loc=3.0 - 2.0j)
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (6, 3, 5)).at[:2].set(True) if masked else None
    feature_shape = (x.shape[feature_axis],)
    state = bnjax.init_state(feature_shape)
    y, new = bnjax.batch_norm(x, state=state, train=True, axis=feature_axis, momentum=0.9, mask=mask)
    y_ref, mean, var = _ref_bn(x, feature_axis, mask)
    assert y.dtype == jnp.complex64 and new.mean.dtype == jnp.complex64 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(new.mean, 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.9 + 0.1 * var, rtol=1e-6)
    # A second step updates the complex running mean; eval normalizes with the complex running statistics.
    _, new2 = bnjax.batch_norm(x, state=new, train=True, axis=feature_axis, momentum=0.9, mask=mask)
    np.testing.assert_allclose(new2.mean, 0.19 * mean, atol=1e-6)
    y_eval, same = bnjax.batch_norm(x, state=new2, train=False, axis=feature_axis)
    assert same is new2
    bshape = [1] * x.ndim
    bshape[feature_axis] = -1
    expected = (np.asarray(x, np.complex128) - np.asarray(new2.mean).reshape(bshape)) / np.sqrt(
        np.asarray(new2.var, np.float64).reshape(bshape) + 1e-5
    )
    np.testing.assert_allclose(y_eval, expected, atol=2e-5)
    # A complex carry from the start (e.g. for lax.scan) keeps its dtypes.
    carry = bnjax.init_state(feature_shape, dtype=jnp.complex64)
    assert carry.var.dtype == jnp.float32
    _, out = bnjax.batch_norm(x, state=carry, train=True, axis=feature_axis, momentum=0.9, mask=mask)
    assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, carry)
    # Complex scale and bias are applied as given.
    scale, bias = jnp.asarray([2.0 - 1.0j] * feature_shape[0]), jnp.asarray([0.5j] * feature_shape[0])
    y_sb, _ = bnjax.batch_norm(x, scale, bias, train=True, axis=feature_axis, mask=mask)
    np.testing.assert_allclose(y_sb, y_ref * (2.0 - 1.0j) + 0.5j, atol=5e-5)


def test_complex_ghost_batches():
    x = _complex(jax.random.key(0), (8, 3), loc=2.0)
    y, state = bnjax.batch_norm(x, state=bnjax.init_state((3,)), train=True, momentum=0.0, virtual_batch_size=4)
    parts = [_ref_bn(x[i : i + 4], -1) for i in (0, 4)]
    np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), atol=2e-5)
    np.testing.assert_allclose(state.mean, (parts[0][1] + parts[1][1]) / 2, atol=1e-6)
    np.testing.assert_allclose(state.var, (parts[0][2] + parts[1][2]) / 2, rtol=1e-6)


def test_complex_nnx_keeps_the_mean_complex():
    x = _complex(jax.random.key(0), (8, 3), loc=1.0 + 1.0j)
    layer = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    y = layer(x)
    y_ref, mean, var = _ref_bn(x, -1)
    assert y.dtype == jnp.complex64 and layer.mean.dtype == jnp.complex64 and layer.var.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(layer.mean[...], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(layer.var[...], 0.9 + 0.1 * var, rtol=1e-6)
    # The same through nnx.jit, where the variable's dtype change goes through the state update.
    jitted = bnjax.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    nnx.jit(lambda m, x: m(x))(jitted, x)
    np.testing.assert_allclose(jitted.mean[...], layer.mean[...], atol=1e-7)


def _device_map(kind, fn, xs, mesh_size=4):
    """Run ``fn`` on each of ``mesh_size`` shards of the leading axis of every array in ``xs`` over axis "d"."""
    if kind == "vmap":
        split = [a.reshape((mesh_size, -1) + a.shape[1:]) for a in xs]
        return jax.tree.map(np.asarray, jax.jit(jax.vmap(fn, axis_name="d"))(*split))
    mesh = jax.make_mesh((mesh_size,), ("d",), devices=jax.devices()[:mesh_size])
    spec = jax.sharding.PartitionSpec("d")
    placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)) for a in xs]
    wrapped = jax.shard_map(
        lambda *a: jax.tree.map(lambda o: o[None], fn(*a)), mesh=mesh, in_specs=spec, out_specs=spec
    )
    return jax.tree.map(np.asarray, jax.jit(wrapped)(*placed))


@pytest.mark.parametrize("groups", [None, [[0, 1], [2, 3]]], ids=["all", "groups"])
@pytest.mark.parametrize("sync", ["gather", "allreduce"])
@pytest.mark.parametrize("kind", ["vmap", "shard_map"])
def test_complex_cross_device_merge(kind, sync, groups):
    # Unequal valid counts per device: a plain pmean of per-device means (Flax's) would not be exact here.
    x = _complex(jax.random.key(0), (16, 3), loc=2.0 - 1.0j)
    x = x + (jnp.arange(16)[:, None] // 4) * (1.0 + 0.5j)  # each device's shard has its own mean
    mask = jnp.arange(16)[:, None] % 4 < jnp.asarray([4, 3, 2, 4]).repeat(4)[:, None]

    def fn(x, m):
        y, s = bnjax.batch_norm(
            x,
            state=bnjax.init_state((3,)),
            train=True,
            momentum=0.0,
            mask=m,
            axis_name="d",
            axis_index_groups=groups,
            sync=sync,
        )
        return y, s.mean, s.var

    y, mean, var = _device_map(kind, fn, (x, mask))
    member_groups = groups or [[0, 1, 2, 3]]
    for group in member_groups:
        rows = np.concatenate([np.arange(4 * d, 4 * d + 4) for d in group])
        y_ref, mean_ref, var_ref = _ref_bn(np.asarray(x)[rows], -1, np.asarray(mask)[rows])
        for d in group:
            np.testing.assert_allclose(mean[d], mean_ref, atol=1e-6)
            np.testing.assert_allclose(var[d], var_ref, rtol=1e-6)
            valid = np.asarray(mask)[4 * d : 4 * d + 4, 0]
            local = y_ref[np.flatnonzero(rows // 4 == d)]
            np.testing.assert_allclose(np.asarray(y[d])[valid], local[valid], atol=2e-5)


def test_complex_cross_device_matches_flax():
    # Equal shards, no mask: Flax's pmean merge is exact too, so the two modules agree under an axis name.
    x = _complex(jax.random.key(0), (4, 6, 3), loc=1.0 + 2.0j)
    kwargs = dict(use_running_average=False, momentum=0.9, axis_name="d")

    def run(model):
        variables = model.init(jax.random.key(1), x[0])
        return jax.vmap(lambda xi: model.apply(variables, xi, mutable=["batch_stats"]), axis_name="d")(x)

    y, stats = run(bnjax.BatchNorm(**kwargs))
    y_flax, stats_flax = run(nn.BatchNorm(use_fast_variance=False, **kwargs))
    np.testing.assert_allclose(y, y_flax, atol=1e-5)
    for k in ("mean", "var"):
        assert stats["batch_stats"][k].dtype == stats_flax["batch_stats"][k].dtype
        np.testing.assert_allclose(stats["batch_stats"][k], stats_flax["batch_stats"][k], atol=1e-6)
    _, mean, var = _ref_bn(x.reshape(-1, 3), -1)
    np.testing.assert_allclose(stats["batch_stats"]["mean"][0], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(stats["batch_stats"]["var"][0], 0.9 + 0.1 * var, rtol=1e-6)
