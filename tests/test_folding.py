"""Folding eval-mode BN into Dense/Conv: the folded BN-free model equals the unfolded model in eval mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.folding import fold_batch_norm


class Net(nn.Module):
    kind: str = "dense"
    conv_bias: bool = True
    with_bn: bool = True
    bn: str = "bnjax"
    eps: float = 1e-3

    def _norm(self, x):
        if not self.with_bn:
            return x
        cls = nn.BatchNorm if self.bn == "flax" else bnjax.BatchNorm
        return cls(use_running_average=True, epsilon=self.eps)(x)

    @nn.compact
    def __call__(self, x):
        use_bias = self.conv_bias or not self.with_bn
        if self.kind == "dense":
            x = nn.Dense(4, use_bias=use_bias)(x)
        else:
            x = nn.Conv(4, (3, 3), use_bias=use_bias)(x)
        x = nn.relu(self._norm(x))
        x = Block(self.with_bn, self.eps)(x)
        return x


class Block(nn.Module):
    with_bn: bool
    eps: float

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(3)(x)
        if self.with_bn:
            x = bnjax.BatchNorm(use_running_average=True, use_scale=False, epsilon=self.eps)(x)
        return x


def _randomize(variables, seed):
    """Non-trivial BN statistics and affine parameters (init would make BN nearly the identity)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = path[-1].key
        if name == "var":
            out.append(jnp.asarray(rng.uniform(0.2, 3.0, leaf.shape), leaf.dtype))
        elif name in ("mean", "bias", "scale"):
            out.append(jnp.asarray(rng.normal(size=leaf.shape) + (1.0 if name == "scale" else 0.0), leaf.dtype))
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize(
    "kind,conv_bias,bn",
    [("dense", True, "bnjax"), ("conv", True, "bnjax"), ("conv", False, "bnjax"), ("conv", False, "flax")],
)
def test_folded_model_matches_eval_mode(kind, conv_bias, bn):
    shape = (5, 3) if kind == "dense" else (2, 6, 6, 3)
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
    model = Net(kind=kind, conv_bias=conv_bias, bn=bn)
    variables = _randomize(model.init(jax.random.key(1), x), 2)
    lin = "Dense_0" if kind == "dense" else "Conv_0"
    pairs = {lin: "BatchNorm_0", ("Block_0", "Dense_0"): ("Block_0", "BatchNorm_0")}
    folded = fold_batch_norm(variables, pairs, epsilon=1e-3)
    assert "batch_stats" not in folded
    plain = Net(kind=kind, with_bn=False)
    y_ref = model.apply(variables, x)
    y = plain.apply(folded, x)  # apply checks that the tree fits the BN-free model exactly
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # The input variables are untouched.
    assert "BatchNorm_0" in variables["params"]
    assert ("bias" in variables["params"][lin]) == conv_bias


def test_float64_reference_and_partial_folding():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    model = Net()
    variables = _randomize(model.init(jax.random.key(1), x), 3)
    folded = fold_batch_norm(variables, {"Dense_0": "BatchNorm_0"}, epsilon={"BatchNorm_0": 1e-3})
    # The second BN stays.
    assert set(folded["batch_stats"]) == {"Block_0"}
    assert "BatchNorm_0" in folded["params"]["Block_0"]
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
    d, bn, st = p["params"]["Dense_0"], p["params"]["BatchNorm_0"], p["batch_stats"]["BatchNorm_0"]
    k = bn["scale"] / np.sqrt(st["var"] + 1e-3)
    np.testing.assert_allclose(folded["params"]["Dense_0"]["kernel"], d["kernel"] * k, rtol=1e-6)
    np.testing.assert_allclose(
        folded["params"]["Dense_0"]["bias"], (d["bias"] - st["mean"]) * k + bn["bias"], rtol=1e-6, atol=1e-6
    )


def test_errors():
    x = jnp.ones((2, 3))
    variables = Net().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'Dense_7'"):
        fold_batch_norm(variables, {"Dense_7": "BatchNorm_0"})
    with pytest.raises(ValueError, match="output features"):
        fold_batch_norm(variables, {("Block_0", "Dense_0"): "BatchNorm_0"})
    with pytest.raises(ValueError, match="kernel"):
        fold_batch_norm(variables, {"BatchNorm_0": "BatchNorm_0"})
    with pytest.raises(ValueError, match="batch_stats"):
        fold_batch_norm({"params": variables["params"]}, {"Dense_0": "BatchNorm_0"})


class TransposeNet(nn.Module):
    transpose_kernel: bool
    with_bn: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.ConvTranspose(4, (3, 3), transpose_kernel=self.transpose_kernel, use_bias=True)(x)
        return bnjax.BatchNorm(use_running_average=True, epsilon=1e-3)(x) if self.with_bn else x


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_kernels_fold_along_their_output_axis(transpose_kernel):
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))  # as many inputs as outputs: the layouts look alike
    net = TransposeNet(transpose_kernel)
    variables = _randomize(net.init(jax.random.key(1), x), 3)
    named = ("ConvTranspose_0",) if transpose_kernel else ()
    folded = fold_batch_norm(variables, {"ConvTranspose_0": "BatchNorm_0"}, epsilon=1e-3, transposed_kernels=named)
    got = TransposeNet(transpose_kernel, with_bn=False).apply(folded, x)
    np.testing.assert_allclose(got, net.apply(variables, x), rtol=1e-4, atol=1e-4)


def test_fold_rejects_negative_variances_and_unknown_transposed_layers():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    variables = _randomize(TransposeNet(False).init(jax.random.key(1), x), 3)
    bad = jax.tree_util.tree_map_with_path(lambda p, v: -v if p[-1].key == "var" else v, variables)
    with pytest.raises(ValueError, match=r"batch_stats 'var'.*>= 0"):
        fold_batch_norm(bad, {"ConvTranspose_0": "BatchNorm_0"})
    with pytest.raises(ValueError, match=r"transposed_kernels names \['Conv_9'\]"):
        fold_batch_norm(variables, {"ConvTranspose_0": "BatchNorm_0"}, transposed_kernels=("Conv_9",))
