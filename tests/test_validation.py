"""Trace-time validation of hyper-parameters across the public API (outside bnjax.curvature): every error
names the argument, the value seen and the valid range; traced values that cannot be checked pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.nnx
from bnjax import landscape
from bnjax._validate import check_scalar, check_values
from bnjax.folding import fold_batch_norm
from bnjax.noisy import sample_nonstationary_noise
from bnjax.renorm import batch_renorm
from bnjax.torch_interop import from_torch, to_torch

X = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
STATE = bnjax.init_state((3,))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(momentum=1.5), r"`momentum`=1.5 is out of range: expected a finite number in \[0, 1\]"),
        (dict(momentum=-0.1), r"`momentum`=-0.1 is out of range.*\[0, 1\]"),
        (dict(momentum=float("nan")), r"`momentum`=nan"),
        (dict(momentum=1.5, convention="torch"), r"`momentum`=1.5.*weight on the new batch"),
        (dict(momentum="0.9"), r"`momentum` must be a real scalar in \[0, 1\]; got '0.9'"),
        (dict(momentum=np.array([0.9, 0.9])), r"`momentum` must be a real scalar"),
        (dict(epsilon=0.0), r"`epsilon`=0.0 is out of range: expected a finite number in \(0, inf\)"),
        (dict(epsilon=-1e-5), r"`epsilon`=-1e-05"),
        (dict(epsilon=float("inf")), r"`epsilon`=inf"),
        (dict(virtual_batch_size=True), r"virtual_batch_size must be a positive int, got True"),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_hyper_parameters(kwargs, match, train):
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda x: bnjax.batch_norm(x, state=STATE, train=train, **kwargs)[0])(X)


def test_bounds_are_valid_and_traced_values_pass():
    for momentum in (0.0, 1.0):
        bnjax.batch_norm(X, state=STATE, train=True, momentum=momentum)
    # A momentum or epsilon traced under jit cannot be checked at trace time and is accepted.
    y, _ = jax.jit(lambda x, m, e: bnjax.batch_norm(x, state=STATE, train=True, momentum=m, epsilon=e))(X, 0.9, 1e-3)
    assert np.all(np.isfinite(y))


def test_modules_validate_their_fields():
    with pytest.raises(ValueError, match=r"`momentum`=1.5"):
        bnjax.BatchNorm(use_running_average=False, momentum=1.5).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"`epsilon`=0"):
        bnjax.BatchNorm(use_running_average=True, epsilon=0).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"`epsilon`=-1"):  # nnx: already at construction
        bnjax.nnx.BatchNorm(3, epsilon=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`momentum`=-0.5"):
        bnjax.nnx.BatchNorm(3, momentum=-0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`momentum`=2"):
        bnjax.BatchRenorm(use_running_average=True, momentum=2).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"`epsilon`=0"):
        batch_renorm(X, None, None, STATE, train=True, epsilon=0.0)
    with pytest.raises(ValueError, match=r"`r_max`=nan"):
        batch_renorm(X, None, None, STATE, train=True, r_max=float("nan"))
    batch_renorm(X, None, None, STATE, train=True, r_max=float("inf"), d_max=float("inf"))  # no clipping: fine


def test_init_state_and_noise_magnitudes():
    with pytest.raises(ValueError, match=r"feature_shape must be a sequence of non-negative ints, got \(3, -1\)"):
        bnjax.init_state((3, -1))
    with pytest.raises(ValueError, match=r"`n_sigma`=inf is out of range: expected a finite number in \[1, inf\)"):
        sample_nonstationary_noise(jax.random.key(0), (4, 2), n_sigma=float("inf"))


def _quadratic(p, b):
    return 0.5 * jnp.sum(p**2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=0.0), r"`learning_rate`=0.0 is out of range: expected a finite number in \(0, inf\)"),
        (dict(learning_rate=-0.1), r"`learning_rate`=-0.1.*uphill"),
        (dict(learning_rate=float("inf")), r"`learning_rate`=inf"),
        (dict(step_sizes=jnp.array([0.1, -0.2])), r"`step_sizes` must be finite and >= 0 everywhere; entry \(1,\)"),
        (dict(step_sizes=jnp.array([0.1, jnp.nan])), r"`step_sizes` must be finite"),
        (dict(step_sizes=jnp.zeros(3)), r"`step_sizes` must include a step > 0"),
        (dict(learning_rate=0.1, chunk_size=-2), r"`chunk_size` must be a positive Python int.*-2"),
    ],
)
def test_smoothness_rejects_bad_steps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        landscape.smoothness(_quadratic, jnp.ones(3), None, **kwargs)


def test_step_size_grid_and_traced_learning_rate():
    with pytest.raises(ValueError, match=r"`low`=-0.5"):
        landscape.step_size_grid(0.1, low=-0.5)
    with pytest.raises(ValueError, match=r"`high`=0.1 is out of range.*\[0.5, inf\)"):
        landscape.step_size_grid(0.1, high=0.1)
    with pytest.raises(ValueError, match=r"`learning_rate`=0"):
        landscape.step_size_grid(0)
    measure = jax.jit(functools.partial(landscape.smoothness, _quadratic))
    res = measure(jnp.ones(3), None, learning_rate=jnp.float32(0.1))  # traced: not checkable, accepted
    np.testing.assert_allclose(res.step_sizes, 0.1 * np.linspace(0.5, 4, 8), rtol=1e-6)


def test_slices_and_histograms():
    p = jnp.ones(3)
    with pytest.raises(ValueError, match=r"`alphas` must be finite everywhere; entry \(2,\) is inf"):
        landscape.slice_1d(_quadratic, p, None, direction=p, alphas=jnp.array([0.0, 1.0, jnp.inf]))
    with pytest.raises(ValueError, match=r"`filter_axis` must be an int"):
        landscape.filter_normalize({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))}, filter_axis=1.0)
    with pytest.raises(ValueError, match=r"`value_range\[1\]`=-1.0 is out of range"):
        landscape.input_statistics(jnp.ones((4, 2)), value_range=(0.0, -1.0))
    with pytest.raises(ValueError, match=r"`value_range\[0\]`=-inf"):
        landscape.histogram_edges(8, (-float("inf"), 1.0))
    with pytest.raises(ValueError, match=r"`bins` must be a positive Python int.*0"):
        landscape.histogram_edges(0)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return bnjax.BatchNorm(use_running_average=True)(nn.Dense(3)(x))


def test_folding_names_layers_shapes_and_epsilon():
    variables = _Net().init(jax.random.key(0), X)
    bad = jax.tree.map(lambda a: a, variables)
    bad["batch_stats"]["BatchNorm_0"]["var"] = jnp.ones(4)
    with pytest.raises(
        ValueError,
        match=r"BN layer 'BatchNorm_0' batch_stats has 'var' of shape \(4,\), but linear layer 'Dense_0' "
        r"has 3 output features \(kernel shape \(3, 3\)\) and BN layer 'BatchNorm_0' has mean of shape \(3,\)",
    ):
        fold_batch_norm(bad, {"Dense_0": "BatchNorm_0"})
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["BatchNorm_0"]["scale"] = jnp.ones((3, 1))
    with pytest.raises(ValueError, match=r"BN layer 'BatchNorm_0' params has 'scale' of shape \(3, 1\)"):
        fold_batch_norm(bad, {"Dense_0": "BatchNorm_0"})
    with pytest.raises(ValueError, match=r"`epsilon \(BN layer 'BatchNorm_0'\)`=0.0 is out of range"):
        fold_batch_norm(variables, {"Dense_0": "BatchNorm_0"}, epsilon=0.0)
    with pytest.raises(ValueError, match=r"mapping without an entry for BN layer 'BatchNorm_0'"):
        fold_batch_norm(variables, {"Dense_0": "BatchNorm_0"}, epsilon={"BatchNorm_1": 1e-5})


def _torch_state(c=3):
    rng = np.random.default_rng(0)
    return {
        "weight": rng.normal(size=c).astype(np.float32),
        "bias": rng.normal(size=c).astype(np.float32),
        "running_mean": rng.normal(size=c).astype(np.float32),
        "running_var": rng.uniform(0.5, 2, size=c).astype(np.float32),
        "num_batches_tracked": np.array(5),
    }


def test_from_torch_is_strict_and_checks_values():
    state = _torch_state()
    expected = r"missing keys \['running_var'\], unexpected keys \['bn1.running_var', 'extra'\]"
    with pytest.raises(ValueError, match=expected):
        from_torch({**{k: v for k, v in state.items() if k != "running_var"}, "bn1.running_var": 1, "extra": 2})
    variables = from_torch({**state, "extra": np.ones(3)}, strict=False)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], state["running_var"])
    with pytest.raises(ValueError, match=r"running_var is negative at indices \[1\] \(e.g. -0.5\)"):
        from_torch({**state, "running_var": np.array([1.0, -0.5, 2.0], np.float32)})
    with pytest.raises(ValueError, match=r"running_mean has non-finite values at indices \[0\]"):
        from_torch({**state, "running_mean": np.array([np.nan, 0.0, 0.0], np.float32)})
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        from_torch({k: v for k, v in state.items() if k != "bias"})
    with pytest.raises(ValueError, match=r"weight has values beyond float32's range at indices \[2\]"):
        from_torch({**state, "weight": np.array([1.0, 2.0, 1e39])})
    for count in (2.5, np.array([5, 6]), True, -1):
        with pytest.raises(ValueError, match=r"num_batches_tracked must be a non-negative integer scalar"):
            from_torch({**state, "num_batches_tracked": count})
    assert int(from_torch({**state, "num_batches_tracked": np.float32(7.0)})["batch_stats"]["num_batches_tracked"]) == 7
    with pytest.raises(TypeError, match=r"bias must hold real numbers, got dtype complex"):
        from_torch({**state, "bias": np.ones(3, np.complex64)})


def test_to_torch_checks_its_input():
    variables = from_torch(_torch_state())
    params, stats = variables["params"], variables["batch_stats"]
    assert sorted(to_torch(params, stats)) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    whole = {"params": {"bn1": params}, "batch_stats": {"bn1": stats}}
    with pytest.raises(ValueError, match=r"batch_stats needs 'mean' and 'var' \(missing \['mean', 'var'\]"):
        to_torch(whole["params"], whole["batch_stats"])
    with pytest.raises(ValueError, match=r"unexpected \['kernel'\]"):
        to_torch({**params, "kernel": np.ones((3, 3))}, stats)
    with pytest.raises(ValueError, match=r"scale has shape \(4,\) but mean has shape \(3,\)"):
        to_torch({**params, "scale": np.ones(4)}, stats)
    with pytest.raises(ValueError, match=r"var is negative at indices \[0\]"):
        to_torch(params, {**stats, "var": np.array([-1.0, 1.0, 1.0])})
    with pytest.raises(ValueError, match=r"mean has non-finite values at indices \[1\]"):
        to_torch(params, {**stats, "mean": np.array([0.0, np.inf, 0.0])})
    with pytest.raises(ValueError, match=r"num_batches_tracked must be a non-negative integer scalar"):
        to_torch(params, {k: v for k, v in stats.items() if k != "num_batches_tracked"}, num_batches_tracked=1.5)


def test_validation_helpers():
    check_scalar(0.5, "a", low=0.0, high=1.0)
    check_scalar(jnp.float32(0.5), "a", low=0.0, high=1.0)
    with pytest.raises(ValueError, match=r"`a`=1.0 is out of range: expected a finite number in \[0, 1\)"):
        check_scalar(1.0, "a", low=0.0, high=1.0, high_open=True)
    check_scalar(float("inf"), "a", low=1.0, finite=False)
    with pytest.raises(ValueError, match=r"`a`=nan"):
        check_scalar(float("nan"), "a", finite=False)
    with pytest.raises(ValueError, match=r"`a` must be a real scalar in \(-inf, inf\); got None"):
        check_scalar(None, "a")
    assert check_values(np.array([1.0, 2.0]), "v", low=0.0, low_open=True) is not None
    with pytest.raises(ValueError, match=r"`v` must be finite and > 0 everywhere; entry \(0, 1\) is 0.0"):
        check_values(np.array([[1.0, 0.0]]), "v", low=0.0, low_open=True)
    seen = []
    jax.jit(lambda v: seen.append(check_values(v, "v")) or v)(jnp.ones(2))
    assert seen == [None]  # traced: unknown at trace time, accepted


def test_train_flag_and_state_are_checked():
    for train in (None, 0, "yes"):
        with pytest.raises(TypeError, match=r"`train` must be True or False"):
            bnjax.batch_norm(X, state=STATE, train=train)
    with pytest.raises(TypeError, match=r"mark it static"):
        jax.jit(lambda x, t: bnjax.batch_norm(x, state=STATE, train=t)[0])(X, True)
    assert np.array_equal(
        bnjax.batch_norm(X, state=STATE, train=np.bool_(True))[0], bnjax.batch_norm(X, state=STATE, train=True)[0]
    )
    int_state = bnjax.BatchNormState(jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.int32))
    with pytest.raises(TypeError, match=r"state.mean has dtype int32; running statistics must be floating"):
        bnjax.batch_norm(X, state=int_state, train=True)
    with pytest.raises(TypeError, match=r"state must be a BatchNormState.*dict"):
        bnjax.batch_norm(X, state={"mean": STATE.mean, "var": STATE.var}, train=True)


def test_numpy_integers_as_axes_and_sizes():
    x = np.random.default_rng(1).standard_normal((8, 4, 3)).astype(np.float32)
    ref = bnjax.batch_norm(x, state=bnjax.init_state((3,)), train=True, axis=-1)[0]
    got = bnjax.batch_norm(x, state=bnjax.init_state(np.int64(3)), train=True, axis=np.int64(-1))[0]
    np.testing.assert_array_equal(got, ref)
    assert bnjax.init_state(3).mean.shape == (3,)
    variables = bnjax.BatchNorm(use_running_average=False, axis=np.int64(-1)).init(jax.random.key(0), x)
    assert variables["params"]["scale"].shape == (3,)
    assert bnjax.nnx.BatchNorm(np.int64(3), rngs=nnx.Rngs(0))(x).shape == x.shape


def test_unsorted_axes_match_flax():
    x = np.random.default_rng(2).standard_normal((8, 4, 3)).astype(np.float32)
    ours = bnjax.BatchNorm(use_running_average=False, axis=(2, 1))
    theirs = nn.BatchNorm(use_running_average=False, axis=(2, 1))
    v_ours, v_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
    assert v_ours["params"]["scale"].shape == v_theirs["params"]["scale"].shape == (4, 3)
    y_ours, _ = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_theirs, _ = theirs.apply(v_theirs, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
