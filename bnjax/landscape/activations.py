"""Per-layer input statistics of a Flax model, captured without rewriting the model.

The inputs of selected submodules (by default every ``nn.Dense`` and ``nn.Conv``: the layer inputs whose
distribution "internal covariate shift" is about) are intercepted with ``flax.linen.intercept_methods``
during one ``apply``; the model's code is untouched. For each captured input (features on the last axis):
per-feature mean and standard deviation over every other axis, and a histogram of all its values on fixed
bin edges, so that histograms from different training steps are comparable (Santurkar et al. 2018, Fig. 2).

Names are the submodules' paths joined by ``/`` (e.g. ``"Dense_1"`` or ``"block/Conv_0"``); a submodule
called more than once gets ``#1``, ``#2``, ... appended for the later calls. A module called from inside a
selected module of the same path (e.g. ``super().__call__``) is not captured twice. Models using lifted
transforms (``nn.scan``, ``nn.remat``, ``nn.vmap``) over selected modules are not supported: their inputs live
in an inner trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from bnjax._validate import check_positive_int, check_scalar

PyTree = Any
ModuleFilter = Callable[[nn.Module], bool] | Sequence[type]

DEFAULT_MODULES = (nn.Dense, nn.Conv)


class ActivationStats(NamedTuple):
    """Statistics of one layer's input (float32; ``C`` features on the last axis, ``bins`` bins).

    Fields:
      mean: [C] per-feature mean over every other axis.
      std: [C] per-feature (biased) standard deviation over every other axis.
      histogram: [bins] counts of all values within ``value_range`` (the last bin includes its right edge).
      below: [] count of values below ``value_range[0]``.
      above: [] count of values above ``value_range[1]``.
    """

    mean: jax.Array
    std: jax.Array
    histogram: jax.Array
    below: jax.Array
    above: jax.Array


def histogram_edges(bins: int = 64, value_range: tuple[float, float] = (-5.0, 5.0)) -> jax.Array:
    """float32[bins + 1]: the bin edges :func:`activation_statistics` uses."""
    _check_histogram(bins, value_range)
    return jnp.linspace(value_range[0], value_range[1], bins + 1, dtype=jnp.float32)


def input_statistics(
    x: jax.Array, *, bins: int = 64, value_range: tuple[float, float] = (-5.0, 5.0)
) -> ActivationStats:
    """:class:`ActivationStats` of one array ``x`` of shape ``(..., C)`` (at least 2 axes)."""
    _check_histogram(bins, value_range)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected an input with a batch axis and a feature axis, got shape {x.shape}.")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=axes))
    mean = mean.reshape(std.shape)
    lo, hi = value_range
    hist, _ = jnp.histogram(x.ravel(), bins=bins, range=(lo, hi))
    return ActivationStats(
        mean.astype(jnp.float32),
        std.astype(jnp.float32),
        hist.astype(jnp.float32),
        jnp.sum(x < lo).astype(jnp.float32),
        jnp.sum(x > hi).astype(jnp.float32),
    )


def _check_histogram(bins: int, value_range: tuple[float, float]) -> None:
    check_positive_int(bins, "bins")
    if not (isinstance(value_range, (tuple, list)) and len(value_range) == 2):
        raise ValueError(f"`value_range` must be a pair (low, high); got {value_range!r}.")
    lo, hi = value_range
    check_scalar(lo, "value_range[0]")
    check_scalar(hi, "value_range[1]", low=lo, low_open=True, hint=" `value_range` is (low, high), low < high.")


def _selector(modules: ModuleFilter) -> Callable[[nn.Module], bool]:
    if callable(modules) and not isinstance(modules, type):
        return modules
    types = (modules,) if isinstance(modules, type) else tuple(modules)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"`modules` must be Flax module classes or a predicate module -> bool; got {modules!r}.")
    return lambda m: isinstance(m, types)


def capture_inputs(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    modules: ModuleFilter = DEFAULT_MODULES,
    **kwargs: Any,
) -> dict[str, jax.Array]:
    """The first positional input of every selected submodule during ``apply_fn(variables, *args, **kwargs)``.

    Args:
      apply_fn: a Flax ``apply`` (e.g. ``model.apply``).
      variables: its variables.
      *args: passed to ``apply_fn``; its output is discarded.
      **kwargs: passed to ``apply_fn`` too (e.g. ``train=True, mutable=["batch_stats"], rngs=...``).
      modules: module classes to select, or a predicate ``module -> bool``.

    Returns:
      ``{name: input}`` in call order (names as in the module docstring).
    """
    select = _selector(modules)
    captured: dict[str, jax.Array] = {}
    active: list[tuple[str, ...]] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not select(module) or module.path in active:
            return next_fun(*call_args, **call_kwargs)
        x = call_args[0] if call_args else next(iter(call_kwargs.values()), None)
        if isinstance(x, jax.Array):
            name = "/".join(module.path) or type(module).__name__
            base, k = name, 0
            while name in captured:
                k += 1
                name = f"{base}#{k}"
            captured[name] = x
        active.append(module.path)
        try:
            return next_fun(*call_args, **call_kwargs)
        finally:
            active.pop()

    with nn.intercept_methods(interceptor):
        apply_fn(variables, *args, **kwargs)
    return captured


def module_call_order(
    apply_fn: Callable[..., Any], variables: PyTree, *args: Any, collection: str | None = "params", **kwargs: Any
) -> tuple[str, ...]:
    """Names of the model's top-level submodules in the order they are first called.

    Runs ``apply_fn(variables, *args, **kwargs)`` abstractly (``jax.eval_shape``: no computation). With
    ``collection`` (default ``"params"``) only submodules holding variables of that collection are listed,
    which is what :func:`bnjax.landscape.internal_covariate_shift` needs as ``layers``.
    """
    order: list[str] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        path = context.module.path
        if path and path[0] not in order:
            order.append(path[0])
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v: apply_fn(v, *args, **kwargs), variables)
    if collection is None:
        return tuple(order)
    if collection not in variables:
        raise ValueError(f"`variables` has no collection {collection!r}; it has {list(variables)}.")
    return tuple(name for name in order if name in variables[collection])


def activation_statistics(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    modules: ModuleFilter = DEFAULT_MODULES,
    bins: int = 64,
    value_range: tuple[float, float] = (-5.0, 5.0),
    **kwargs: Any,
) -> dict[str, ActivationStats]:
    """Per-layer input statistics (:class:`ActivationStats`) of one forward pass; jittable.

    Args:
      apply_fn, variables, modules: as in :func:`capture_inputs`.
      *args: as in :func:`capture_inputs`.
      **kwargs: as in :func:`capture_inputs`.
      bins: number of histogram bins (static).
      value_range: ``(low, high)`` of the histogram (static); the edges are :func:`histogram_edges`.

    Returns:
      ``{layer name: ActivationStats}`` in call order. Jit it once with ``apply_fn`` and the options bound,
      e.g. ``jax.jit(functools.partial(activation_statistics, model.apply, train=False))``.
    """
    _check_histogram(bins, value_range)
    inputs = capture_inputs(apply_fn, variables, *args, modules=modules, **kwargs)
    return {name: input_statistics(x, bins=bins, value_range=value_range) for name, x in inputs.items()}
