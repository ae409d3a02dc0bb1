"""Models for the experiments, each with a switch for the normalization.

Every model is a Flax linen module called as ``model.apply(variables, x, train=..., mutable=...)``:
``x`` is ``float32[batch, *input_shape]`` (features/channels last), the output is
``float32[batch, num_classes]``. Normalization (``norm``):

- ``"none"``: no normalization (the Dense/Conv layers keep their bias);
- ``"bn"``: :class:`bnjax.BatchNorm` (train mode normalizes with batch statistics, eval mode with the
  running ones);
- ``"noisy"``: noisy BN (Santurkar et al. 2018, Algorithm 1): BN followed by non-stationary noise drawn from
  the ``"noise"`` PRNG stream at every training step (``rngs={"noise": key}`` in ``apply``).

``bn_position`` puts the normalization before the activation (``"before"``, Ioffe & Szegedy's placement) or
after it (``"after"``). ``init_scale`` multiplies the standard deviation of every hidden kernel's
initialization (1.0 = LeCun normal for tanh/linear, He normal for relu).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

import bnjax
from bnjax.noisy import NoisyBatchNorm

Norm = Literal["none", "bn", "noisy"]
Position = Literal["before", "after"]
NORMS = ("none", "bn", "noisy")
POSITIONS = ("before", "after")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}
_GAIN2 = {"relu": 2.0, "tanh": 1.0, "identity": 1.0}


def _check(norm: str, bn_position: str, activation: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if bn_position not in POSITIONS:
        raise ValueError(f"bn_position must be one of {POSITIONS}, got {bn_position!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}.")


def _kernel_init(activation: str, init_scale: float) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(_GAIN2[activation] * init_scale**2, "fan_in", "truncated_normal")


def _normalize(
    x: jax.Array,
    norm: str,
    train: bool,
    momentum: float | None,
    virtual_batch_size: int | None = None,
    convention: str = "flax",
) -> jax.Array:
    if norm == "bn":
        return bnjax.BatchNorm(
            use_running_average=not train,
            momentum=momentum,
            virtual_batch_size=virtual_batch_size,
            convention=convention,
        )(x)
    if norm == "noisy":
        return NoisyBatchNorm(use_running_average=not train, momentum=momentum, convention=convention)(x)
    return x


class _NormAct(nn.Module):
    """``act(norm(x))`` or ``norm(act(x))`` according to ``bn_position``."""

    norm: Norm
    bn_position: Position
    activation: str
    momentum: float | None
    virtual_batch_size: int | None = None
    convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        opts = (self.norm, train, self.momentum, self.virtual_batch_size, self.convention)
        if self.bn_position == "before":
            return act(_normalize(x, *opts))
        return _normalize(act(x), *opts)


class MLP(nn.Module):
    """Fully connected network: ``[Dense -> norm/activation] * len(features) -> Dense(num_classes)``.

    Inputs of any shape ``[batch, ...]`` are flattened to ``[batch, prod(...)]``. ``virtual_batch_size``
    turns BN into ghost BN (sub-batches of that size normalized separately; it must divide the batch);
    ``convention="torch"`` reads ``momentum`` as PyTorch does (weight of the latest batch; None = cumulative).
    """

    features: Sequence[int] = (200, 200)
    num_classes: int = 10
    activation: str = "tanh"
    norm: Norm = "none"
    bn_position: Position = "before"
    momentum: float | None = 0.99
    init_scale: float = 1.0
    virtual_batch_size: int | None = None
    convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        _check(self.norm, self.bn_position, self.activation)
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            # A bias right before BN is cancelled by the mean subtraction: leave it out.
            use_bias = self.norm == "none" or self.bn_position == "after"
            x = nn.Dense(width, use_bias=use_bias, kernel_init=_kernel_init(self.activation, self.init_scale))(x)
            x = _NormAct(
                self.norm, self.bn_position, self.activation, self.momentum, self.virtual_batch_size, self.convention
            )(x, train)
        return nn.Dense(self.num_classes)(x)


class CNN1D(nn.Module):
    """1-D convolutional network for sequences ``[batch, length]`` or ``[batch, length, channels]``.

    ``[Conv(k=kernel_size, stride 2) -> norm/activation] * len(channels) -> flatten -> Dense(num_classes)``;
    BN statistics are per channel over batch and length; ``virtual_batch_size`` and ``convention`` as in
    :class:`MLP`.
    """

    channels: Sequence[int] = (32, 32, 32)
    kernel_size: int = 5
    num_classes: int = 10
    activation: str = "relu"
    norm: Norm = "none"
    bn_position: Position = "before"
    momentum: float | None = 0.99
    init_scale: float = 1.0
    virtual_batch_size: int | None = None
    convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        _check(self.norm, self.bn_position, self.activation)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"CNN1D expects inputs [batch, length] or [batch, length, channels], got {x.shape}.")
        for c in self.channels:
            use_bias = self.norm == "none" or self.bn_position == "after"
            x = nn.Conv(
                c,
                (self.kernel_size,),
                strides=(2,),
                use_bias=use_bias,
                kernel_init=_kernel_init(self.activation, self.init_scale),
            )(x)
            x = _NormAct(
                self.norm, self.bn_position, self.activation, self.momentum, self.virtual_batch_size, self.convention
            )(x, train)
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class VGG(nn.Module):
    """Small VGG-style 2-D network for images ``[batch, height, width, channels]``.

    Per stage: ``[Conv3x3 -> norm/activation] * convs_per_stage -> max-pool 2x2``; then flatten and
    ``Dense(num_classes)``; ``virtual_batch_size`` and ``convention`` as in :class:`MLP`.
    """

    channels: Sequence[int] = (16, 32)
    convs_per_stage: int = 2
    num_classes: int = 10
    activation: str = "relu"
    norm: Norm = "none"
    bn_position: Position = "before"
    momentum: float | None = 0.99
    init_scale: float = 1.0
    virtual_batch_size: int | None = None
    convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        _check(self.norm, self.bn_position, self.activation)
        if x.ndim != 4:
            raise ValueError(f"VGG expects images [batch, height, width, channels], got shape {x.shape}.")
        for c in self.channels:
            for _ in range(self.convs_per_stage):
                use_bias = self.norm == "none" or self.bn_position == "after"
                x = nn.Conv(c, (3, 3), use_bias=use_bias, kernel_init=_kernel_init(self.activation, self.init_scale))(x)
                x = _NormAct(
                    self.norm,
                    self.bn_position,
                    self.activation,
                    self.momentum,
                    self.virtual_batch_size,
                    self.convention,
                )(x, train)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class Linear(nn.Module):
    """One-layer linear model ``Dense(num_classes)(norm(x))`` on flattened inputs.

    With ``norm="bn"`` the inputs are standardized per feature (BN without scale and bias), which is the
    preconditioning whose effect on the Hessian's conditioning the ``conditioning`` experiment measures.
    """

    num_classes: int = 10
    norm: Norm = "none"
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if self.norm not in ("none", "bn"):
            raise ValueError(f"Linear supports norm 'none' or 'bn', got {self.norm!r}.")
        x = x.reshape((x.shape[0], -1))
        if self.norm == "bn":
            x = bnjax.BatchNorm(use_running_average=not train, momentum=self.momentum, use_scale=False, use_bias=False)(
                x
            )
        return nn.Dense(self.num_classes)(x)


class DeepLinear(nn.Module):
    """Deep linear chain ``y = x W1 W2 ... W_depth W_out`` (no biases, no activation).

    With ``norm="bn"``, a BN follows each hidden ``W_i``, so the output scale no longer depends on the earlier
    weights' scale.
    """

    depth: int = 8
    width: int = 32
    num_classes: int = 10
    norm: Norm = "none"
    momentum: float = 0.99
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if self.norm not in ("none", "bn"):
            raise ValueError(f"DeepLinear supports norm 'none' or 'bn', got {self.norm!r}.")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}.")
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            x = nn.Dense(self.width, use_bias=False, kernel_init=_kernel_init("identity", self.init_scale))(x)
            x = _normalize(x, self.norm, train, self.momentum)
        return nn.Dense(self.num_classes, use_bias=False)(x)


MODELS = {"mlp": MLP, "cnn1d": CNN1D, "vgg": VGG, "linear": Linear, "deep_linear": DeepLinear}


def make_model(name: str, **kwargs) -> nn.Module:
    """A model by name (``mlp``, ``cnn1d``, ``vgg``, ``linear``, ``deep_linear``) with its fields as keywords."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {tuple(MODELS)}.")
    return MODELS[name](**kwargs)


# The architecture families an experiment with a ``model`` option offers (``--model``), and the data each needs.
FAMILIES = ("mlp", "cnn1d", "vgg")


def family_model(
    family: str,
    norm: str,
    num_classes: int,
    *,
    hidden: Sequence[int] = (200, 200),
    activation: str = "relu",
    **norm_options,
) -> nn.Module:
    """An experiment's network by family: ``mlp`` (``hidden``), ``cnn1d`` (MNIST-1D sequences) or ``vgg``
    (images, e.g. ``--dataset digits``), each with its default layer sizes and ``norm`` after every layer.

    ``norm_options`` (``momentum``, ``convention``, ``virtual_batch_size``) go to every family's BN layers."""
    unknown = set(norm_options) - {"momentum", "convention", "virtual_batch_size"}
    if unknown:
        raise TypeError(f"family_model got unknown norm options {sorted(unknown)}.")
    if family == "mlp":
        return MLP(features=tuple(hidden), num_classes=num_classes, activation=activation, norm=norm, **norm_options)
    if family == "cnn1d":
        return CNN1D(num_classes=num_classes, activation=activation, norm=norm, **norm_options)
    if family == "vgg":
        return VGG(num_classes=num_classes, activation=activation, norm=norm, **norm_options)
    raise ValueError(f"model must be one of {FAMILIES}, got {family!r}.")


def describe_family(family: str, *, hidden: Sequence[int] = (200, 200), activation: str = "relu") -> str:
    """One line naming the network of :func:`family_model`, for a report's setting table."""
    if family == "mlp":
        return f"MLP {'-'.join(str(h) for h in hidden)} ({activation}), norm after each hidden Dense"
    if family == "cnn1d":
        c = CNN1D()
        return (
            f"1-D CNN: {len(c.channels)} x Conv(k={c.kernel_size}, stride 2, {c.channels[0]} channels) - norm - "
            f"{activation}, then Dense"
        )
    if family == "vgg":
        v = VGG()
        return (
            f"VGG-style: stages of {v.convs_per_stage} x Conv3x3 - norm - {activation}, max-pool; channels "
            f"{'/'.join(str(c) for c in v.channels)}; then Dense"
        )
    raise ValueError(f"model must be one of {FAMILIES}, got {family!r}.")
