"""bnjax.as_functional: the NNX and Equinox paths of the model-level helpers give the linen path's numbers on
the same small model (weights copied across), and an explicit Hessian's top eigenvalue."""

import functools

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import bnjax  # noqa: E402
import bnjax.nnx  # noqa: E402
from bnjax import curvature as cv  # noqa: E402
from bnjax import landscape  # noqa: E402
from bnjax.equinox import BatchNorm as EqxBatchNorm  # noqa: E402

MOMENTUM = 0.9


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(4)(x)
        x = bnjax.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
        return nn.Dense(1)(jnp.tanh(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(4, momentum=MOMENTUM, rngs=rngs)
        self.l2 = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


class EqxNet(eqx.Module):
    l1: eqx.nn.Linear
    bn: EqxBatchNorm
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(3, 4, key=k1)
        self.bn = EqxBatchNorm(4, "batch", momentum=MOMENTUM)
        self.l2 = eqx.nn.Linear(4, 1, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.l1(x), state)
        return self.l2(jnp.tanh(h)), state


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


X = jax.random.normal(jax.random.key(1), (8, 3)) * 2.0 + 0.5
Y = jax.random.normal(jax.random.key(2), (8, 1))
RUNNING = {"mean": jnp.array([0.3, -1.0, 0.5, 2.0]), "var": jnp.array([2.0, 0.5, 1.5, 3.0])}


def linen_setup():
    model = LinenNet()
    variables = model.init(jax.random.key(0), X)
    variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": RUNNING}}
    return model.apply, variables


def to_nnx(tree):
    """A linen params-like tree (params, or a gradient of them) in the NNX model's layout."""
    return {"l1": tree["Dense_0"], "bn": tree["BatchNorm_0"], "l2": tree["Dense_1"]}


def to_eqx(tree, template):
    """The same for the Equinox model's float leaves (``Linear.weight`` is the transposed kernel)."""
    return eqx.tree_at(
        lambda m: (m.l1.weight, m.l1.bias, m.l2.weight, m.l2.bias, m.bn.weight, m.bn.bias),
        template,
        (
            tree["Dense_0"]["kernel"].T,
            tree["Dense_0"]["bias"],
            tree["Dense_1"]["kernel"].T,
            tree["Dense_1"]["bias"],
            tree["BatchNorm_0"]["scale"],
            tree["BatchNorm_0"]["bias"],
        ),
    )


def framework_setup(framework, linen_variables):
    """``(functional, variables with the linen weights and running statistics, params converter)``."""
    params = linen_variables["params"]
    if framework == "nnx":
        f = bnjax.as_functional(NNXNet(nnx.Rngs(0)))
        return f, {"params": to_nnx(params), "batch_stats": {"bn": RUNNING}}, to_nnx
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    f = bnjax.as_functional(model, state)
    running = state.get(model.bn.state_index)._replace(mean=RUNNING["mean"], var=RUNNING["var"])
    template = f.variables["params"]
    return (
        f,
        {"params": to_eqx(params, template), "batch_stats": state.set(model.bn.state_index, running)},
        (lambda tree: to_eqx(tree, template)),
    )


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_loss_gradient_and_hvp_match_linen(framework, bn_mode):
    apply, lv = linen_setup()
    f, fv, convert = framework_setup(framework, lv)
    ref = cv.flax_curvature_fns(apply, mse, bn_mode=bn_mode)
    fns = cv.flax_curvature_fns(f.apply, mse, bn_mode=bn_mode)
    batch = (X, Y)
    loss_ref, grad_ref = jax.value_and_grad(ref.loss_fn)(lv["params"], batch, lv["batch_stats"])
    loss, grad = jax.value_and_grad(fns.loss_fn)(fv["params"], batch, fv["batch_stats"])
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    assert_trees_close(grad, convert(grad_ref))
    hvp_ref = cv.hvp(ref.loss_fn, lv["params"], grad_ref, batch, lv["batch_stats"])
    hvp = cv.hvp(fns.loss_fn, fv["params"], convert(grad_ref), batch, fv["batch_stats"])
    assert_trees_close(hvp, convert(hvp_ref), rtol=1e-4, atol=1e-5)
    gnvp_ref = cv.gnvp(ref.output_fn, ref.output_loss, lv["params"], grad_ref, batch, lv["batch_stats"])
    gnvp = cv.gnvp(fns.output_fn, fns.output_loss, fv["params"], convert(grad_ref), batch, fv["batch_stats"])
    assert_trees_close(gnvp, convert(gnvp_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_top_hessian_eigenvalue_matches_explicit_hessian(framework):
    _, lv = linen_setup()
    f, fv, _ = framework_setup(framework, lv)
    loss_fn = cv.flax_curvature_fns(f.apply, mse, bn_mode="train").loss_fn
    flat, unravel = ravel_pytree(fv["params"])
    hessian = jax.hessian(lambda w: loss_fn(unravel(w), (X, Y), fv["batch_stats"]))(flat)
    expected = np.linalg.eigvalsh(np.asarray(hessian, np.float64))[-1]
    v0 = cv.random_like(jax.random.key(3), fv["params"])
    result = cv.lanczos_top(
        cv.hessian_matvec(loss_fn),
        v0,
        fv["params"],
        (X, Y),
        fv["batch_stats"],
        tol=1e-7,
        residual_tol=1e-4,
        max_iters=25,
    )
    np.testing.assert_allclose(result.eigenvalue, expected, rtol=1e-3)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_train_mode_updates_and_rebuild(framework):
    apply, lv = linen_setup()
    f, fv, _ = framework_setup(framework, lv)
    y_ref, updated_ref = apply(lv, X, train=True, mutable=["batch_stats"])
    y, updated = f.apply(fv, X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.apply(fv, X, train=False), apply(lv, X), rtol=1e-5, atol=1e-6)
    new_ref = updated_ref["batch_stats"]["BatchNorm_0"]
    if framework == "nnx":
        np.testing.assert_allclose(updated["batch_stats"]["bn"]["mean"], new_ref["mean"], rtol=1e-5)
        np.testing.assert_allclose(updated["batch_stats"]["bn"]["var"], new_ref["var"], rtol=1e-5)
        model = f.rebuild(fv)
        model.eval()
        np.testing.assert_allclose(model(X), apply(lv, X), rtol=1e-5, atol=1e-6)
    else:
        model, state = f.rebuild(fv)
        # The Equinox layer's first batch replaces the running state (exact debiasing), linen's blends it.
        mean = jnp.mean(X @ lv["params"]["Dense_0"]["kernel"], axis=0) + lv["params"]["Dense_0"]["bias"]
        np.testing.assert_allclose(updated["batch_stats"].get(model.bn.state_index).mean, mean, rtol=1e-5)
        y_inf, _ = jax.vmap(eqx.nn.inference_mode(model), axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            X, state
        )
        np.testing.assert_allclose(y_inf, apply(lv, X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_precise_batch_stats_match_linen_and_numpy(framework):
    apply, lv = linen_setup()
    f, fv, _ = framework_setup(framework, lv)
    batches = [jax.random.normal(jax.random.key(10 + i), (n, 3)) * 2.0 + 1.0 for i, n in enumerate((5, 5, 3))]
    ref = bnjax.precise_batch_stats(lambda v, b: apply(v, b), lv, batches, progress=False)["BatchNorm_0"]
    stats = bnjax.precise_batch_stats(f.apply, fv, batches, progress=False)
    if framework == "nnx":
        got = stats["bn"]
        assert fv["batch_stats"]["bn"]["mean"] is RUNNING["mean"]  # input not modified
    else:
        model, _ = f.rebuild(fv)
        got = stats.get(model.bn.state_index)._asdict()
        np.testing.assert_array_equal(fv["batch_stats"].get(model.bn.state_index).mean, RUNNING["mean"])
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], ref["var"], rtol=1e-5)
    dense = lv["params"]["Dense_0"]
    h = np.concatenate([np.asarray(b, np.float64) @ np.asarray(dense["kernel"], np.float64) for b in batches])
    h = h + np.asarray(dense["bias"], np.float64)
    np.testing.assert_allclose(got["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], h.var(0), rtol=1e-5)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_landscape_measures_match_linen(framework):
    apply, lv = linen_setup()
    f, fv, convert = framework_setup(framework, lv)
    ref = cv.flax_curvature_fns(apply, mse, bn_mode="train").loss_fn
    loss_fn = cv.flax_curvature_fns(f.apply, mse, bn_mode="train").loss_fn
    direction = landscape.random_direction(jax.random.key(4), lv["params"])
    alphas = jnp.linspace(-1.0, 1.0, 5)

    @functools.partial(jax.jit, static_argnums=0)  # one compiled program each, as users run them
    def measures(fn, params, stats, direction):
        slice_ = landscape.slice_1d(fn, params, (X, Y), stats, direction=direction, alphas=alphas)
        return slice_, landscape.smoothness(fn, params, (X, Y), stats, learning_rate=0.1)

    s_ref, m_ref = measures(ref, lv["params"], lv["batch_stats"], direction)
    s, m = measures(loss_fn, fv["params"], fv["batch_stats"], convert(direction))
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    assert_trees_close(m, m_ref, rtol=1e-4, atol=1e-6)


def test_precise_batch_stats_nnx_with_flax_batch_norm():
    """Flax's own nnx.BatchNorm layers (features on the last axis of a conv input) are tapped too."""

    class ConvNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, kernel_size=(2,), rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    f = bnjax.as_functional(ConvNet(nnx.Rngs(0)))
    batches = [jax.random.normal(jax.random.key(20 + i), (n, 5, 2)) + i for i, n in enumerate((4, 2))]
    stats = bnjax.precise_batch_stats(f.apply, f.variables, batches, progress=False)
    model = f.rebuild(f.variables)
    h = np.concatenate([np.asarray(model.conv(b), np.float64).reshape(-1, 3) for b in batches])
    np.testing.assert_allclose(stats["bn"]["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn"]["var"], h.var(0), rtol=1e-5)


def test_internal_covariate_shift_nnx_params_are_a_layer_dict():
    apply, lv = linen_setup()
    f, fv, convert = framework_setup("nnx", lv)
    ref = cv.flax_curvature_fns(apply, mse, bn_mode="train").loss_fn
    loss_fn = cv.flax_curvature_fns(f.apply, mse, bn_mode="train").loss_fn
    updates = jax.tree.map(lambda g: -0.1 * g, jax.grad(ref)(lv["params"], (X, Y), lv["batch_stats"]))
    r_ref = landscape.internal_covariate_shift(
        ref, lv["params"], (X, Y), lv["batch_stats"], updates=updates, layers=["Dense_0", "BatchNorm_0", "Dense_1"]
    )
    r = landscape.internal_covariate_shift(
        loss_fn, fv["params"], (X, Y), fv["batch_stats"], updates=convert(updates), layers=["l1", "bn", "l2"]
    )
    assert_trees_close(r, r_ref, rtol=1e-4, atol=1e-6)


def test_as_functional_rejects_what_it_cannot_adapt():
    with pytest.raises(TypeError, match="linen model already is functional"):
        bnjax.as_functional(LinenNet())
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    with pytest.raises(TypeError, match="eqx.nn.State"):
        bnjax.as_functional(model)
    with pytest.raises(TypeError, match="state=None"):
        bnjax.as_functional(NNXNet(nnx.Rngs(0)), state)


def test_precise_rejects_equinox_batch_norm():
    class Net(eqx.Module):
        bn: eqx.nn.BatchNorm

        def __init__(self):
            self.bn = eqx.nn.BatchNorm(3, "batch", mode="batch")

        def __call__(self, x, state):
            return self.bn(x, state)

    model, state = eqx.nn.make_with_state(Net)()
    f = bnjax.as_functional(model, state)
    with pytest.raises(TypeError, match="bnjax.equinox.BatchNorm"):
        bnjax.precise_batch_stats(f.apply, f.variables, [X], progress=False)
