"""Per-layer input statistics of a Flax linen, Flax NNX or Equinox model, captured without rewriting the model.

The inputs of selected layers (by default the dense and convolution layers: the layer inputs whose
distribution "internal covariate shift" is about) are recorded by layer taps during one forward pass
(:func:`bnjax.taps.run_tapped`: ``flax.linen.intercept_methods`` for a linen ``apply``; for NNX and Equinox
the ``apply`` of :func:`bnjax.as_functional` wraps the selected layers of a throwaway copy of the model); the
model's code is untouched. For each captured input: per-feature mean and standard deviation over every other
axis, and a histogram of all its values on fixed bin edges, so that histograms from different training steps
are comparable (Santurkar et al. 2018, Fig. 2).

Names are the layers' paths joined by ``/`` (e.g. ``"Dense_1"`` or ``"block/Conv_0"`` in linen, the attribute
paths ``"l1"`` or ``"layers/0"`` in NNX and Equinox); a layer called more than once gets ``#1``, ``#2``, ...
appended for the later calls. A linen module called from inside a selected module of the same path (e.g.
``super().__call__``) is not captured twice. Models using lifted transforms (``nn.scan``, ``nn.remat``,
``nn.vmap``, or ``jax.lax.scan`` / an inner ``vmap`` in an Equinox model) over selected layers are not
supported: their inputs live in an inner trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax._validate import check_positive_int, check_scalar
from bnjax.landscape.covariate_shift import layer_keys
from bnjax.taps import Framework, Select, TappedRun, framework, path_name, run_tapped

PyTree = Any
ModuleFilter = type | str | Sequence[type | str] | Callable[[Any], bool]


class ActivationStats(NamedTuple):
    """Statistics of one layer's input (float32; ``C`` features, ``bins`` bins).

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
    x: jax.Array, *, axis: int = -1, bins: int = 64, value_range: tuple[float, float] = (-5.0, 5.0)
) -> ActivationStats:
    """:class:`ActivationStats` of one array ``x`` (at least 2 axes), its ``C`` features on ``axis``."""
    _check_histogram(bins, value_range)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected an input with a batch axis and a feature axis, got shape {x.shape}.")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"`axis` must be an int naming an axis of the input of shape {x.shape}; got {axis!r}.")
    if not jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"expected a real input (float or integer), got dtype {x.dtype}.")
    x = jnp.moveaxis(x, axis, -1)
    if x.size == 0:
        raise ValueError(
            f"the input of shape {x.shape} (features last) has no elements per feature: its mean and spread "
            "are undefined."
        )
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


def _selector(modules: ModuleFilter | None, fw: Framework) -> tuple[Select, tuple[str, ...]]:
    """``(select(path, layer), the layer paths named)`` of a ``modules=`` argument."""
    if modules is None:
        modules = fw.dense_and_conv
    if callable(modules) and not isinstance(modules, type):
        predicate = modules
        return (lambda path, layer: bool(predicate(layer))), ()
    entries = (modules,) if isinstance(modules, (type, str)) else modules
    if not isinstance(entries, Sequence):
        entries = ()
    types = tuple(e for e in entries if isinstance(e, type) and issubclass(e, fw.module_type))
    paths = tuple(e for e in entries if isinstance(e, str))
    if not entries or len(types) + len(paths) != len(entries):
        raise TypeError(
            f"`modules` must be {fw.name} layer classes and/or layer paths ('block/Dense_0'), or a predicate "
            f"layer -> bool; got {modules!r}."
        )
    return (lambda path, layer: isinstance(layer, types) or path_name(path) in paths), paths


def _run(
    apply_fn: Callable[..., Any], modules: ModuleFilter | None, variables: PyTree, args: tuple, kwargs: dict
) -> TappedRun:
    """:func:`bnjax.taps.run_tapped` with the layers ``modules`` selects; raises for a path the model lacks."""
    select, paths = _selector(modules, framework(apply_fn))
    run = run_tapped(apply_fn, select, variables, *args, **kwargs)
    known = [path_name(p) for p in run.layers]
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise ValueError(f"`modules` names layers {unknown} that the model does not have; its layers are {known}.")
    return run


def capture_inputs(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    modules: ModuleFilter | None = None,
    **kwargs: Any,
) -> dict[str, jax.Array]:
    """The first positional input of every selected layer during ``apply_fn(variables, *args, **kwargs)``.

    Args:
      apply_fn: a Flax linen ``apply`` (e.g. ``model.apply``), or for an NNX module or an Equinox
        ``(model, state)`` the ``apply`` of ``f = bnjax.as_functional(...)`` (then ``variables`` is
        ``f.variables``, ``args`` the model's inputs and ``train=`` is required).
      variables: its variables.
      *args: passed to ``apply_fn``; its output is discarded.
      **kwargs: passed to ``apply_fn`` too (e.g. ``train=True, mutable=["batch_stats"], rngs=...``).
      modules: which layers: a layer class, or a sequence of layer classes and layer paths (strings as in
        the returned names, e.g. ``"block/Dense_0"``), or a predicate ``layer -> bool`` (for linen the bound
        module, with ``.name`` and ``.path``). None (default): the framework's dense and convolution layers
        (``nn.Dense`` and ``nn.Conv``; ``nnx.Linear`` and ``nnx.Conv``; ``eqx.nn.Linear`` and
        ``eqx.nn.Conv``).

    Returns:
      ``{name: input}`` in call order (names as in the module docstring). For Equinox each input is the
      per-example input stacked over the batch: ``(batch, *example_shape)``, channels on axis 1.

    Raises:
      TypeError: ``modules`` holds something other than the framework's layer classes and paths, or
        ``apply_fn`` is a model rather than its ``apply``.
      ValueError: ``modules`` names a path that is not a layer of the model (the message lists them).
    """
    captured: dict[str, jax.Array] = {}
    for call in _run(apply_fn, modules, variables, args, kwargs).calls:
        if isinstance(call.x, jax.Array):
            name = path_name(call.path) or type(call.layer).__name__
            base, k = name, 0
            while name in captured:
                k += 1
                name = f"{base}#{k}"
            captured[name] = call.x
    return captured


def module_call_order(
    apply_fn: Callable[..., Any], variables: PyTree, *args: Any, collection: str | None = "params", **kwargs: Any
) -> tuple[str, ...]:
    """Names of the model's top-level submodules in the order they are first called.

    Runs ``apply_fn(variables, *args, **kwargs)`` abstractly (``jax.eval_shape``: no computation), recording
    every layer call (see :func:`capture_inputs` for ``apply_fn``: a linen ``apply`` or that of
    :func:`bnjax.as_functional`). A submodule is first called when its ``__call__`` or that of one of its own
    submodules is (a layer used only through other methods, e.g. ``nn.Embed.attend``, is not seen). With
    ``collection`` (default ``"params"``) only submodules holding variables of that collection are listed
    (top-level keys of ``variables[collection]``: dict keys, or an Equinox model's field names), which is
    what :func:`bnjax.landscape.internal_covariate_shift` needs as ``layers``.
    """
    paths: list[tuple] = []

    def trace(v):
        run = run_tapped(apply_fn, lambda path, layer: True, v, *args, **kwargs)
        paths.extend(call.path for call in run.calls)
        return run.outputs

    jax.eval_shape(trace, variables)
    order = tuple(dict.fromkeys(str(path[0]) for path in paths if path))
    if collection is None:
        return order
    if collection not in variables:
        raise ValueError(f"`variables` has no collection {collection!r}; it has {list(variables)}.")
    keys = layer_keys(variables[collection])
    return tuple(name for name in order if name in keys)


def activation_statistics(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    modules: ModuleFilter | None = None,
    bins: int = 64,
    value_range: tuple[float, float] = (-5.0, 5.0),
    **kwargs: Any,
) -> dict[str, ActivationStats]:
    """Per-layer input statistics (:class:`ActivationStats`) of one forward pass; jittable.

    Args:
      apply_fn, variables, modules: as in :func:`capture_inputs` (linen, or NNX and Equinox through
        :func:`bnjax.as_functional`).
      *args: as in :func:`capture_inputs`.
      **kwargs: as in :func:`capture_inputs`.
      bins: number of histogram bins (static).
      value_range: ``(low, high)`` of the histogram (static); the edges are :func:`histogram_edges`.

    Returns:
      ``{layer name: ActivationStats}`` in call order; features on the last axis of each input (linen, NNX)
      or on axis 1 (Equinox: channels first per example). Jit it once with ``apply_fn`` and the options
      bound, e.g. ``jax.jit(functools.partial(activation_statistics, model.apply, train=False))``.
    """
    _check_histogram(bins, value_range)
    axis = framework(apply_fn).feature_axis
    inputs = capture_inputs(apply_fn, variables, *args, modules=modules, **kwargs)
    return {name: input_statistics(x, axis=axis, bins=bins, value_range=value_range) for name, x in inputs.items()}
