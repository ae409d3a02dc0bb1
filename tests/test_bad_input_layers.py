"""Bad input to the layer-level helpers (taps, precise BN, landscape measures, noise, adapters, wrappers): a
clear error naming the argument, or an honest NaN, never a silent wrong answer (found by an audit of the
public API; the numerics guide's "Failure behaviour" lists each case)."""

import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
import bnjax.equinox
import bnjax.nnx
from bnjax import landscape, loops, noisy, statistics
from bnjax.precise import precise_batch_stats
from bnjax.renorm import batch_renorm
from bnjax.taps import run_tapped


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = bnjax.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
        return nn.Dense(2)(nn.relu(x))


NET = Net()
X = jax.random.normal(jax.random.key(0), (8, 5)) * 2.0 + 1.0
VARIABLES = NET.init(jax.random.key(1), X)
EVAL = lambda v, b: NET.apply(v, b, train=False)  # noqa: E731
PARAMS = {"w": jnp.ones((5, 2)), "b": jnp.zeros(2)}


def loss_fn(p, x):
    return jnp.mean((x @ p["w"] + p["b"][None]) ** 2)


def test_jitted_apply_is_rejected_by_every_layer_tap():
    """A compiled apply runs its modules only at its first trace: taps recorded tracers, then nothing."""
    jitted = jax.jit(NET.apply)
    for call in (
        lambda: landscape.capture_inputs(jitted, VARIABLES, X),
        lambda: landscape.module_call_order(jitted, VARIABLES, X),
        lambda: precise_batch_stats(jax.jit(EVAL), VARIABLES, [X], progress=False),
    ):
        with pytest.raises(TypeError, match=r"jax.jit-compiled function.*Pass the un-jitted apply"):
            call()
    with pytest.raises(TypeError, match=r"`select` must be a predicate"):
        run_tapped(NET.apply, ("Dense_0",), VARIABLES, X)


def test_precise_batch_stats_needs_eval_mode_and_a_collection_of_batches():
    train_apply = lambda v, b: NET.apply(v, b, train=True, mutable=["batch_stats"])  # noqa: E731
    with pytest.raises(ValueError, match=r"returned updated 'batch_stats'.*eval mode"):
        precise_batch_stats(train_apply, VARIABLES, [X], progress=False)

    class TrainBN(nn.Module):  # a BN layer fixed in train mode, with batch_stats immutable: still train mode
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(x)

    tvars = TrainBN().init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"ran with use_running_average=False"):
        precise_batch_stats(lambda v, b: TrainBN().apply(v, b, mutable=["batch_stats"])[0], tvars, [X], progress=False)
    with pytest.raises(TypeError, match=r"got one mapping dict; wrap a single batch in a list"):
        precise_batch_stats(EVAL, VARIABLES, {"x": X}, progress=False)
    with pytest.raises(TypeError, match=r"cannot be called inside jax.jit"):
        jax.jit(lambda v: precise_batch_stats(EVAL, v, [X], progress=False))(VARIABLES)
    # An empty batch adds no element: the result equals the one without it.
    with_empty = precise_batch_stats(EVAL, VARIABLES, [X, X[:0], 2.0 * X], progress=False)
    without = precise_batch_stats(EVAL, VARIABLES, [X, 2.0 * X], progress=False)
    jax.tree.map(np.testing.assert_array_equal, with_empty, without)


def test_landscape_nan_is_nan_not_smooth_or_orthogonal():
    nan_loss = lambda p, x: loss_fn(p, x) * jnp.nan  # noqa: E731
    r = landscape.smoothness(nan_loss, PARAMS, X, learning_rate=0.01)
    assert np.isnan(r.beta_smoothness) and np.isnan(r.loss_variation)
    ok = landscape.smoothness(loss_fn, PARAMS, X, learning_rate=0.01)
    assert np.isfinite(ok.beta_smoothness) and ok.beta_smoothness > 0
    flat = lambda p, x: jnp.sum(p["b"]) * 0.0  # noqa: E731  # zero gradient: 0 by definition
    assert float(landscape.smoothness(flat, PARAMS, X, learning_rate=0.01).beta_smoothness) == 0.0
    updates = {"w": jnp.full((5, 2), jnp.nan), "b": jnp.zeros(2)}
    shift = landscape.internal_covariate_shift(loss_fn, PARAMS, X, updates=updates, layers=["w", "b"])
    assert np.isnan(np.asarray(shift.cosine)[1])  # the layer after the NaN update
    with pytest.raises(TypeError, match=r"`layers` entries must be keys of `params` \(strings\).*got 0"):
        landscape.internal_covariate_shift(loss_fn, PARAMS, X, updates=PARAMS, layers=[0, 1])


def test_smoothness_checks_params_and_accumulates_norms_in_float32():
    with pytest.raises(ValueError, match=r"`params` has no array leaves"):
        landscape.smoothness(lambda p, x: jnp.sum(x), {}, X, learning_rate=0.01)
    with pytest.raises(TypeError, match=r"`params` leaf \['n'\] has dtype int32"):
        landscape.smoothness(loss_fn, {**PARAMS, "n": jnp.int32(3)}, X, learning_rate=0.01)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), PARAMS)
    r = landscape.smoothness(lambda p, x: loss_fn(jax.tree.map(lambda a: a.astype(jnp.float32), p), x), bf16, X,
                             learning_rate=0.01)  # fmt: skip
    assert r.grad_norm.dtype == jnp.float32


def test_values_beyond_float32_and_bad_arrays_are_errors():
    with pytest.raises(ValueError, match=r"`n_mu`=1e\+39 is beyond float32's range"):
        noisy.add_nonstationary_noise(jax.random.key(1), X, n_mu=1e39)
    with pytest.raises(ValueError, match=r"`high`=1e\+39 is beyond float32's range"):
        landscape.step_size_grid(0.1, high=1e39)
    with pytest.raises(ValueError, match=r"`value_range\[1\]`=1e\+39 is beyond float32's range"):
        landscape.input_statistics(X, value_range=(0.0, 1e39))
    with pytest.raises(ValueError, match=r"shape \(0, 3\) .* no elements per feature"):
        landscape.input_statistics(jnp.zeros((0, 3)))
    with pytest.raises(TypeError, match=r"expected a real input .* complex64"):
        landscape.input_statistics(jnp.ones((4, 3), jnp.complex64))
    for bad in (lambda p, x: x @ p["w"], lambda p, x: (loss_fn(p, x), 1.0)):
        with pytest.raises(TypeError, match=r"`loss_fn` must return a scalar float loss"):
            landscape.slice_1d(bad, PARAMS, X, direction=PARAMS, alphas=jnp.linspace(-1.0, 1.0, 3))
    with pytest.raises(TypeError, match=r"dtype \(the output dtype\) must be a floating-point .* int32"):
        bnjax.batch_norm(X, train=True, dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"dtype \(the output dtype\) must be a floating-point"):
        batch_renorm(X, None, None, bnjax.init_state(5), train=True, dtype=jnp.int32)


def test_noise_and_directions_check_keys_shapes_and_dtypes():
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        landscape.random_direction(0, PARAMS)
    with pytest.raises(ValueError, match=r"`key` must be a single PRNG key"):
        noisy.add_nonstationary_noise(jax.random.split(jax.random.key(0), 2), X)
    for shape in (4, (-1, 3), None):
        with pytest.raises(ValueError, match=r"`shape` must be a sequence of non-negative ints"):
            noisy.sample_nonstationary_noise(jax.random.key(0), shape)
    with pytest.raises(TypeError, match=r"`dtype` must be a real float dtype"):
        noisy.sample_nonstationary_noise(jax.random.key(0), (4, 3), dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"y must be a real floating-point array, got dtype complex64"):
        noisy.add_nonstationary_noise(jax.random.key(0), jnp.ones((4, 3), jnp.complex64))
    np.testing.assert_array_equal(  # NumPy integers as sizes, same draw
        noisy.sample_nonstationary_noise(jax.random.key(0), (np.int64(4), 3)).scale,
        noisy.sample_nonstationary_noise(jax.random.key(0), (4, 3)).scale,
    )


def test_local_moments_checks_axes_and_mask():
    x = jax.random.normal(jax.random.key(0), (4, 4))
    for axes in ((), (5,), (0, 0)):
        with pytest.raises(ValueError, match=r"reduction_axes must be"):
            statistics.local_moments(x, axes)
    for mask in (jnp.full((4, 4), 0.5), jnp.ones(4, bool)):
        with pytest.raises(ValueError, match=r"mask must be a boolean array of the input's shape \(4, 4\)"):
            statistics.local_moments(x, (0,), mask)
    m = statistics.local_moments(x, (0,), jnp.ones((4, 4), bool))
    np.testing.assert_allclose((m.shift + m.offset)[0], x.mean(0), rtol=1e-5, atol=1e-6)


def test_axis_index_groups_and_scan_lengths_are_checked():
    for groups in ([], [0, 1, 2, 3]):
        with pytest.raises(ValueError, match=r"axis_index_groups must be a non-empty sequence of non-empty groups"):
            jax.vmap(lambda x, g=groups: bnjax.batch_norm(x, train=True, axis_name="i", axis_index_groups=g)[0],
                     axis_name="i")(jnp.ones((4, 3, 2)))  # fmt: skip
    step = lambda c, x: (c + x, c)  # noqa: E731
    for placement in ("device", "host"):
        for length in (0, -1, 2.0):
            with pytest.raises(ValueError, match=r"`length` \(the number of steps\) must be a positive int"):
                loops.scan_steps(step, jnp.float32(0.0), length, jnp.float32(1.0), placement=placement)
    # A step that changes its carry's dtype ran on the host and failed on the device; now both refuse it.
    widen = lambda c, x: ((c + x).astype(jnp.int32), c)  # noqa: E731
    for placement in ("device", "host"):
        with pytest.raises(TypeError, match=r"carry"):
            loops.scan_steps(widen, jnp.float32(0.0), 3, jnp.float32(1.0), placement=placement)
    with pytest.raises(TypeError, match=r"`state` must be a NamedTuple with fields `done` and `query`; got tuple"):
        loops.Driver("host").iterate(lambda s, v: s, lambda o, q: q, (jnp.array(True), jnp.ones(3)), None)


def test_torch_convention_refuses_statistics_without_their_counter():
    v = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
         "batch_stats": {"mean": jnp.full(3, 5.0), "var": jnp.full(3, 2.0)}}  # fmt: skip
    layer = bnjax.BatchNorm(use_running_average=False, convention="torch", momentum=None)
    with pytest.raises(ValueError, match=r"no 'num_batches_tracked'.*from_torch"):
        layer.apply(v, X[:, :3], mutable=["batch_stats"])
    fresh = layer.init(jax.random.key(0), X[:, :3])  # init still creates the counter
    assert int(fresh["batch_stats"]["num_batches_tracked"]) == 0
    with pytest.raises(ValueError, match=r"axis must be an int or a tuple of ints"):
        bnjax.BatchNorm(use_running_average=True, axis=None).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"test_local_stats=False where set"):
        bnjax.BatchNorm(use_running_average=True, test_local_stats=True).init(jax.random.key(0), X[:1])


class NNXNet(nnx.Module):
    def __init__(self, rngs, n=4):
        self.lin, self.bn = nnx.Linear(5, n, rngs=rngs), bnjax.nnx.BatchNorm(n, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.lin(x))


def test_functional_apply_checks_variables_and_train():
    f, g = bnjax.as_functional(NNXNet(nnx.Rngs(0))), bnjax.as_functional(NNXNet(nnx.Rngs(0), 6))
    with pytest.raises(ValueError, match=r"\['lin'\]\['kernel'\] has shape \(5, 6\), expected \(5, 4\)"):
        f.apply(g.variables, X, train=False)
    with pytest.raises(ValueError, match=r"'params' is missing"):
        f.apply({"batch_stats": f.variables["batch_stats"]}, X, train=False)
    with pytest.raises(TypeError, match=r"`train` must be True or False"):
        f.apply(f.variables, X, train=None)
    assert f.apply(f.variables, X, train=False).shape == (8, 4)
    with pytest.raises(TypeError, match=r"num_features must be an int"):
        bnjax.nnx.BatchNorm(3.0, rngs=nnx.Rngs(0))

    model, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(np.int64(3), "batch")  # NumPy ints accepted
    e = bnjax.as_functional(model, state)
    other = bnjax.as_functional(*eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(4, "batch"))
    with pytest.raises(ValueError, match=r"does not fit this model"):
        e.apply(other.variables, jnp.ones((8, 3)), train=False)
    with pytest.raises(TypeError, match=r"must be a real float dtype, got int32"):
        bnjax.equinox.BatchNorm(3, "batch", dtype=jnp.int32)


def test_functional_train_mode_needs_mutable_batch_stats_as_linen():
    """Linen raises when a train-mode apply would update immutable batch statistics; the NNX and Equinox
    functional forms did not, and returned the outputs alone with the updated statistics dropped."""
    f = bnjax.as_functional(NNXNet(nnx.Rngs(0)))
    model, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(5, "batch")
    e = bnjax.as_functional(model, state)
    with pytest.raises(Exception, match=r"batch_stats"):  # the reference behaviour
        NET.apply(VARIABLES, X, train=True)
    for g, owner in ((f, "nnx_model"), (e, "equinox_model")):
        for mutable in (False, ["params"], "params"):
            pattern = rf"as_functional\({owner}.*mutable={re.escape(repr(mutable))} does not ask for"
            with pytest.raises(ValueError, match=pattern):
                g.apply(g.variables, X, train=True, mutable=mutable)
        for mutable in (True, "batch_stats", ["batch_stats"], ("params", "batch_stats")):
            y, upd = g.apply(g.variables, X, train=True, mutable=mutable)
            assert y.shape[0] == 8 and jax.tree.leaves(upd["batch_stats"])
        assert g.apply(g.variables, X, train=False).shape[0] == 8  # eval mode needs nothing
    plain = bnjax.as_functional(nnx.Linear(5, 2, rngs=nnx.Rngs(0)))  # no statistics: nothing to drop
    assert plain.apply(plain.variables, X, train=True).shape == (8, 2)


def test_train_only_batch_norm_still_trains_bn_through_functional_variables():
    m = NNXNet(nnx.Rngs(0))
    variables = bnjax.as_functional(m).variables
    tx = bnjax.frozen.train_only_batch_norm(optax.sgd(0.1), variables)
    grads = jax.tree.map(jnp.ones_like, variables["params"])
    updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    assert np.all(np.asarray(updates["bn"]["scale"]) != 0) and np.all(np.asarray(updates["lin"]["kernel"]) == 0)
