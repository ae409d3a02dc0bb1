"""Layer taps: what the selected layers of a model receive during one forward pass, for every framework.

:func:`run_tapped` runs a model once and records, in call order, the first positional input of each call of
the layers a predicate ``select(path, layer)`` picks; the model's code is untouched. It is the one mechanism
behind the per-layer helpers (precise BN's layer-by-layer passes, :func:`bnjax.landscape.capture_inputs`,
:func:`bnjax.landscape.activation_statistics`, :func:`bnjax.landscape.module_call_order`); only how a layer
is tapped depends on the framework:

- Flax linen (a plain ``apply_fn``): ``flax.linen.intercept_methods`` sees every module method call. A
  module called from inside a selected module of the same path (``super().__call__``) is recorded once.
- Flax NNX and Equinox (the ``apply`` of :func:`bnjax.as_functional`, which implements ``run_tapped``):
  the model is rebuilt from ``variables`` and each selected callable submodule is replaced by a thin wrapper
  that records its input and calls it. For Equinox the records are made inside the per-example ``vmap`` and
  leave it as extra outputs, so each input comes back stacked over the batch (leading axis), channels on
  axis 1. Only ``__call__`` is recorded; other attributes and methods of a wrapped layer pass through.

Paths name the layers: linen module paths (``("block", "Dense_0")``), NNX attribute paths as in
``nnx.iter_graph`` (``("layers", 0)``, the keys of ``as_functional``'s pure dicts), Equinox field paths as
strings (``("layers", "0")``). Layers inside lifted transforms (linen ``nn.scan``/``nn.vmap``, ``jax.lax.scan``
or an inner ``vmap`` in an Equinox model) live in an inner trace and cannot be recorded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from flax import linen as nn

Select = Callable[[tuple, Any], bool]


class LayerCall(NamedTuple):
    """One recorded call of a selected layer.

    Fields:

    - ``path``: the layer's path (see the module docstring).
    - ``layer``: the layer object (a bound linen module, an NNX module, an Equinox module).
    - ``x``: its first positional input (the first keyword argument's value if called without positional
      ones); for Equinox stacked over the batch, or None where it was not an array.
    - ``kwargs``: the call's keyword arguments (linen and NNX; empty for Equinox, whose keyword arguments are
      per-example values inside the ``vmap``).
    """

    path: tuple
    layer: Any
    x: Any
    kwargs: dict


class TappedRun(NamedTuple):
    """Result of :func:`run_tapped`.

    Fields:

    - ``outputs``: what ``apply_fn(variables, *args, **kwargs)`` returned.
    - ``calls``: the :class:`LayerCall` of each call of a selected layer, in call order.
    - ``layers``: the paths of the layers that could be selected (linen: every submodule a method of which was
      called; NNX and Equinox: every callable submodule), for validating a selection by path.
    """

    outputs: Any
    calls: tuple[LayerCall, ...]
    layers: tuple[tuple, ...]


class Framework(NamedTuple):
    """What the per-layer helpers need to know about a framework.

    Fields:

    - ``name``: e.g. ``"flax.linen"``.
    - ``module_type``: the base class of its layers (to validate a selection by type).
    - ``dense_and_conv``: its dense and convolution layer classes (the default layer selection).
    - ``feature_axis``: the feature axis of the recorded inputs of those layers (-1, or 1 for Equinox's
      channels-first examples stacked over the batch).
    """

    name: str
    module_type: type
    dense_and_conv: tuple[type, ...]
    feature_axis: int


LINEN = Framework("flax.linen", nn.Module, (nn.Dense, nn.Conv), -1)


def framework(apply_fn: Any) -> Framework:
    """The :class:`Framework` of ``apply_fn``: that of an :func:`bnjax.as_functional` ``apply``, else linen.

    Raises a TypeError for a model object (an NNX or Equinox module) passed where its ``apply`` belongs.
    """
    found = getattr(apply_fn, "framework", None)
    if isinstance(found, Framework):
        return found
    if _is_module(apply_fn):
        raise TypeError(
            f"expected a model's apply function, got a {type(apply_fn).__name__} module. For an NNX module or "
            "an Equinox (model, state) pass f.apply and f.variables of f = bnjax.as_functional(...); for a "
            "flax.linen model pass model.apply and its variables."
        )
    return LINEN


def _is_module(obj: Any) -> bool:
    from flax import nnx

    eqx = sys.modules.get("equinox")  # not imported by bnjax unless the user's model is an Equinox one
    return isinstance(obj, (nnx.Module, nn.Module)) or (eqx is not None and isinstance(obj, eqx.Module))


def run_tapped(apply_fn: Callable[..., Any], select: Select, variables: Any, *args: Any, **kwargs: Any) -> TappedRun:
    """Run ``apply_fn(variables, *args, **kwargs)`` recording the calls of the layers ``select`` picks.

    Args:
      apply_fn: a linen ``apply`` (e.g. ``model.apply`` or a function of ``(variables, ...)`` calling it), or
        the ``apply`` of :func:`bnjax.as_functional` (then ``args`` is ``(inputs,)`` and ``kwargs`` holds
        ``train=`` and optionally ``mutable=``).
      select: ``select(path, layer) -> bool`` for each candidate layer (linen: at each ``__call__``).
      variables, *args, **kwargs: passed to ``apply_fn``.

    Returns:
      :class:`TappedRun`. Works under ``jax.jit`` and ``jax.eval_shape`` (the recorded inputs are then
      traced values of that trace).
    """
    framework(apply_fn)
    if not callable(select):
        raise TypeError(
            f"`select` must be a predicate select(path, layer) -> bool; got {select!r}. To pick layers by path "
            "use e.g. lambda path, layer: path in {('Dense_0',)}."
        )
    tapped = getattr(apply_fn, "run_tapped", None)
    if tapped is not None:
        return tapped(select, variables, *args, **kwargs)
    if hasattr(apply_fn, "lower"):  # a jax.jit-compiled function: it traces once, later calls run no module
        raise TypeError(
            "apply_fn is a jax.jit-compiled function; layer taps record the modules' calls while apply_fn runs, "
            "which a compiled function does only at its first trace. Pass the un-jitted apply (e.g. "
            "model.apply); jit the function that calls this one instead."
        )
    calls: list[LayerCall] = []
    layers: list[tuple] = []
    active: list[tuple] = []
    seen: list[bool] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        seen.append(True)
        module = context.module
        path = tuple(module.path)
        if path and path not in layers:
            layers.append(path)
        if context.method_name != "__call__" or path in active or not select(path, module):
            return next_fun(*call_args, **call_kwargs)
        x = call_args[0] if call_args else next(iter(call_kwargs.values()), None)
        calls.append(LayerCall(path, module, x, dict(call_kwargs)))
        active.append(path)
        try:
            return next_fun(*call_args, **call_kwargs)
        finally:
            active.pop()

    with nn.intercept_methods(interceptor):
        outputs = apply_fn(variables, *args, **kwargs)
    if not seen:
        raise ValueError(
            "apply_fn ran no flax.linen module method, so no layer could be recorded. Pass a linen apply (e.g. "
            "model.apply, not a jax.jit-compiled one), or the apply of bnjax.as_functional for NNX/Equinox."
        )
    return TappedRun(outputs, tuple(calls), tuple(layers))


def path_name(path: tuple) -> str:
    """A layer path as a string, its keys joined by ``/`` (``("block", 0)`` -> ``"block/0"``)."""
    return "/".join(map(str, path))


def wrapped_order(paths: list[tuple]) -> list[int]:
    """Indices of ``paths`` deepest first: wrapping a layer before its parent keeps every parent reachable by
    its original path."""
    return sorted(range(len(paths)), key=lambda i: -len(paths[i]))
