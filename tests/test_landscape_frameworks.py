"""The per-layer landscape helpers (capture_inputs, activation_statistics, module_call_order,
internal_covariate_shift) on NNX and Equinox models give the linen path's numbers on twin models with copied
weights; the layer taps they share with precise BN reach layers in containers; bad selections raise."""

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import bnjax  # noqa: E402
import bnjax.nnx  # noqa: E402
from bnjax import curvature as cv  # noqa: E402
from bnjax import landscape  # noqa: E402
from bnjax.equinox import BatchNorm as EqxBatchNorm  # noqa: E402


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Conv(3, (2,), padding="VALID")(x)  # (B, 5, 2) -> (B, 4, 3)
        h = bnjax.BatchNorm(use_running_average=not train)(h)
        return nn.Dense(2)(jnp.tanh(h).reshape(h.shape[0], -1))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(2,), padding="VALID", rngs=rngs)
        self.bn = bnjax.nnx.BatchNorm(3, rngs=rngs)
        self.linear = nnx.Linear(12, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.conv(x)))
        return self.linear(h.reshape(h.shape[0], -1))


class EqxNet(eqx.Module):
    conv: eqx.nn.Conv1d
    bn: EqxBatchNorm
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(2, 3, 2, key=k1)  # one example (2, 5) -> (3, 4), channels first
        self.bn = EqxBatchNorm(3, "batch")
        self.linear = eqx.nn.Linear(12, 2, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.conv(x), state)
        return self.linear(jnp.tanh(h).T.reshape(-1)), state  # flattened position-major, as linen's


X = jax.random.normal(jax.random.key(1), (6, 5, 2)) * 1.5 + 0.5  # linen / NNX layout (batch, length, channels)
Y = jax.random.normal(jax.random.key(2), (6, 2))
LINEN_NAMES = ("Conv_0", "BatchNorm_0", "Dense_0")
NAMES = ("conv", "bn", "linear")  # the NNX and Equinox attribute names of the same layers


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


def linen_setup():
    model = LinenNet()
    return model.apply, model.init(jax.random.key(0), X)


def twin(framework, lv):
    """``(apply, variables, inputs, params converter)`` of the framework's twin holding the linen weights."""
    p = lv["params"]
    if framework == "nnx":
        f = bnjax.as_functional(NNXNet(nnx.Rngs(0)))
        to_nnx = lambda t: dict(zip(NAMES, (t[n] for n in LINEN_NAMES)))  # noqa: E731
        variables = {"params": to_nnx(p), "batch_stats": {"bn": lv["batch_stats"]["BatchNorm_0"]}}
        return f.apply, variables, X, to_nnx
    model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    f = bnjax.as_functional(model, state)
    template = f.variables["params"]

    def to_eqx(t):
        leaves = (
            t["Conv_0"]["kernel"].transpose(2, 1, 0),  # (width, in, out) -> (out, in, width)
            t["Conv_0"]["bias"][:, None],
            t["BatchNorm_0"]["scale"],
            t["BatchNorm_0"]["bias"],
            t["Dense_0"]["kernel"].T,
            t["Dense_0"]["bias"],
        )
        where = lambda m: (m.conv.weight, m.conv.bias, m.bn.weight, m.bn.bias, m.linear.weight, m.linear.bias)  # noqa: E731
        return eqx.tree_at(where, template, leaves)

    return f.apply, {"params": to_eqx(p), "batch_stats": state}, X.transpose(0, 2, 1), to_eqx


def linen_layout(framework, x):
    """An input recorded by the framework, in linen's layout (Equinox stacks channels-first examples)."""
    return jnp.moveaxis(x, 1, -1) if framework == "equinox" else x


MODES = {"eval": {"train": False}, "train": {"train": True, "mutable": ["batch_stats"]}}


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_captured_inputs_and_statistics_match_linen(framework, mode):
    apply, lv = linen_setup()
    f_apply, fv, inputs, _ = twin(framework, lv)
    kwargs = MODES[mode]
    ref = landscape.capture_inputs(apply, lv, X, modules=(nn.Dense, nn.Conv, bnjax.BatchNorm), **kwargs)
    bn_type = bnjax.nnx.BatchNorm if framework == "nnx" else EqxBatchNorm
    got = landscape.capture_inputs(f_apply, fv, inputs, modules=[bn_type, "conv", "linear"], **kwargs)
    assert list(ref) == list(LINEN_NAMES) and list(got) == list(NAMES)
    for name, linen_name in zip(NAMES, LINEN_NAMES):
        np.testing.assert_allclose(linen_layout(framework, got[name]), ref[linen_name], rtol=1e-5, atol=1e-6)
    # Default selection (dense and conv layers), under jit, with the batch stacked for Equinox.
    options = dict(bins=8, value_range=(-2.0, 2.0), **kwargs)
    stats = lambda fn, v, x: landscape.activation_statistics(fn, v, x, **options)  # noqa: E731
    s_ref = jax.jit(stats, static_argnums=0)(apply, lv, X)
    s = jax.jit(stats, static_argnums=0)(f_apply, fv, inputs)
    assert list(s) == ["conv", "linear"]
    for name, linen_name in (("conv", "Conv_0"), ("linear", "Dense_0")):
        for field in ("mean", "std"):
            np.testing.assert_allclose(getattr(s[name], field), getattr(s_ref[linen_name], field), atol=1e-5)
        for field in ("histogram", "below", "above"):
            np.testing.assert_array_equal(getattr(s[name], field), getattr(s_ref[linen_name], field))
    x = np.asarray(ref["Dense_0"], np.float64)  # and the statistics against NumPy's
    np.testing.assert_allclose(s["linear"].std, x.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s["linear"].histogram, np.histogram(x, bins=np.linspace(-2, 2, 9))[0])


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_internal_covariate_shift_matches_linen(framework):
    apply, lv = linen_setup()
    f_apply, fv, inputs, convert = twin(framework, lv)
    linen_layers = landscape.module_call_order(apply, lv, X)
    layers = landscape.module_call_order(f_apply, fv, inputs, train=False)
    assert linen_layers == LINEN_NAMES and layers == NAMES
    ref_loss = cv.flax_curvature_fns(apply, mse, bn_mode="train").loss_fn
    loss_fn = cv.flax_curvature_fns(f_apply, mse, bn_mode="train").loss_fn
    params = lv["params"]
    opt = optax.sgd(0.5, momentum=0.9)
    grads = jax.grad(ref_loss)(params, (X, Y), lv["batch_stats"])
    updates, _ = opt.update(grads, opt.init(params), params)
    ics = jax.jit(landscape.internal_covariate_shift, static_argnums=0, static_argnames="layers")
    ref = ics(ref_loss, params, (X, Y), lv["batch_stats"], updates=updates, layers=linen_layers)
    got = ics(loss_fn, fv["params"], (inputs, Y), fv["batch_stats"], updates=convert(updates), layers=layers)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.min(ref.grad_distance[1:])) > 1e-4  # the earlier layers' step moves the later gradients


def test_layers_inside_containers():
    """Equinox ``Sequential`` (a wrapped BatchNorm stays a StatefulLayer) and an NNX list of layers."""
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(3, 4, key=jax.random.key(0)), EqxBatchNorm(4, "batch"), eqx.nn.Lambda(jnp.tanh)]
    )
    f = bnjax.as_functional(model, state)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    got = landscape.capture_inputs(
        f.apply, f.variables, x, train=True, mutable=["batch_stats"], modules=(EqxBatchNorm, "layers/0")
    )
    np.testing.assert_allclose(got["layers/1"], jax.vmap(model.layers[0])(x), rtol=1e-6)
    np.testing.assert_array_equal(got["layers/0"], x)
    assert landscape.module_call_order(f.apply, f.variables, x, train=False) == ("layers",)
    precise = bnjax.precise_batch_stats(f.apply, f.variables, [x], progress=False)
    np.testing.assert_allclose(precise.get(model.layers[1].state_index).var, np.var(got["layers/1"], 0), rtol=1e-5)

    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jnp.tanh(self.layers[0](x)))

    f = bnjax.as_functional(Stack(nnx.Rngs(0)))
    got = landscape.capture_inputs(f.apply, f.variables, x, train=False)
    module = f.rebuild(f.variables)
    assert list(got) == ["layers/0", "layers/1"]
    assert landscape.module_call_order(f.apply, f.variables, x, train=False) == ("layers",)  # nnx.List untapped
    np.testing.assert_allclose(got["layers/1"], jnp.tanh(module.layers[0](x)), rtol=1e-6)


def test_bad_selections_and_inputs_raise():
    apply, lv = linen_setup()
    for framework in ("nnx", "equinox"):
        f_apply, fv, inputs, _ = twin(framework, lv)
        with pytest.raises(ValueError, match=r"names layers \['dense'\].*its layers are \[.*'linear'"):
            landscape.capture_inputs(f_apply, fv, inputs, train=False, modules=["conv", "dense"])
        with pytest.raises(TypeError, match=f"`modules` must be {'flax.nnx' if framework == 'nnx' else 'equinox'}"):
            landscape.activation_statistics(f_apply, fv, inputs, train=False, modules=(nn.Dense,))
        with pytest.raises(TypeError, match="modules"):
            landscape.capture_inputs(f_apply, fv, inputs, train=False, modules=3)
    with pytest.raises(ValueError, match=r"names layers \['Dense_1'\]"):
        landscape.capture_inputs(apply, lv, X, modules="Dense_1")
    assert list(landscape.capture_inputs(apply, lv, X, modules=["Dense_0"])) == ["Dense_0"]  # by path in linen
    with pytest.raises(ValueError, match="`axis`"):
        landscape.input_statistics(X, axis=3)
    with pytest.raises(TypeError, match="as_functional"):
        landscape.capture_inputs(NNXNet(nnx.Rngs(0)), {}, X)
    with pytest.raises(TypeError, match="model with named fields"):
        landscape.layer_groups([jnp.ones(2)], ["0"])
