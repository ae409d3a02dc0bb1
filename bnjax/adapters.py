"""One functional form for every framework: NNX and Equinox models as a Flax-linen-style ``(apply, variables)``.

bnjax's model-level helpers (:func:`bnjax.curvature.flax_curvature_fns` and through it the landscape measures,
:func:`bnjax.precise_batch_stats`) take a linen ``apply`` and a variables dict ``{"params", "batch_stats"}``.
:func:`as_functional` turns a Flax NNX module, or an Equinox model and its ``eqx.nn.State``, into exactly that
form, so every helper serves all three frameworks through one code path:

- NNX: ``nnx.split`` into ``Param`` / ``BatchStat`` / the rest; ``variables`` holds the first two as pure dicts
  (``nnx.to_pure_dict``: nested dicts keyed like the module's attributes); ``apply`` merges them back,
  switches ``model.train()`` / ``model.eval()`` and calls the model.
- Equinox: ``eqx.partition(model, eqx.is_inexact_array)``; ``variables`` holds the float leaves as
  ``params`` and the ``eqx.nn.State`` as ``batch_stats``; ``apply`` combines them, sets
  ``eqx.nn.inference_mode`` and maps the per-example model over the batch with ``jax.vmap(...,
  axis_name=axis_name)`` (its BatchNorm layers must use that ``axis_name``).

``apply`` also taps the model's layers (:func:`bnjax.taps.run_tapped`: it records the inputs of selected
layers, what linen's ``intercept_methods`` does for linen models), which is what
:func:`bnjax.precise_batch_stats` and the per-layer landscape helpers (:func:`bnjax.landscape.capture_inputs`,
:func:`bnjax.landscape.activation_statistics`, :func:`bnjax.landscape.module_call_order`) need beyond a
forward pass.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
from flax import nnx

from bnjax import nnx as bnjax_nnx
from bnjax._validate import check_bool, check_stats_mutable, check_variables, tree_shapes
from bnjax.precise import write_dict_stats
from bnjax.statistics import Moments
from bnjax.taps import Framework, LayerCall, TappedRun, wrapped_order

PyTree = Any
NNX_BATCH_NORM_TYPES: tuple[type, ...] = (bnjax_nnx.BatchNorm, nnx.BatchNorm)


class Functional(NamedTuple):
    """A model as a linen-style function and its variables.

    Fields:

    - ``apply``: ``apply(variables, inputs, *, train: bool, mutable=False)`` -> outputs, or with ``mutable``
      (e.g. ``["batch_stats"]``) ``(outputs, {"batch_stats": updated})``, as ``flax.linen.Module.apply``.
      ``train=True`` normalizes with batch statistics and, as in linen, needs ``mutable`` to include
      ``"batch_stats"`` when the model has any (an error otherwise, not dropped statistics). ``inputs`` are
      what the model is called on (a whole batch; Equinox models are vmapped over its leading axis).
    - ``variables``: ``{"params": ..., "batch_stats": ...}``; ``params`` are what to differentiate.
    - ``rebuild``: ``rebuild(variables)`` -> the framework's model with these values: an NNX module (a new
      one; or use ``nnx.update``), or ``(model, state)`` for Equinox.
    """

    apply: Callable[..., Any]
    variables: dict[str, PyTree]
    rebuild: Callable[[dict[str, PyTree]], Any]


def as_functional(
    model: Any,
    state: Any = None,
    *,
    call: Callable[..., Any] | None = None,
    axis_name: Any = "batch",
) -> Functional:
    """The linen-style :class:`Functional` form of an NNX module or of an Equinox ``(model, state)``.

    Args:
      model: a ``flax.nnx.Module``, or an ``equinox.Module`` called per example.
      state: the ``eqx.nn.State`` of an Equinox model (None for NNX).
      call: how to call the model on ``inputs``; default ``model(inputs)`` for NNX and
        ``model(example, state)`` -> ``(output, state)`` for Equinox (per example, inside the vmap).
      axis_name: Equinox only: the ``vmap`` axis name, the ``axis_name`` of the model's BatchNorm layers.

    Example::

        f = bnjax.as_functional(nnx_model)
        fns = bnjax.curvature.flax_curvature_fns(f.apply, loss, bn_mode="train")
        fns.loss_fn(f.variables["params"], (x, y), f.variables["batch_stats"])
    """
    if isinstance(model, nnx.Module):
        if state is not None:
            raise TypeError("as_functional: an NNX module carries its own state; pass state=None.")
        return _NNXApply.functional(model, call)
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(model, eqx.Module):
        from bnjax.equinox import functional

        return functional(model, state, call=call, axis_name=axis_name)
    raise TypeError(
        f"as_functional takes a flax.nnx.Module or an equinox.Module (with its eqx.nn.State), got "
        f"{type(model).__name__}. A flax.linen model already is functional: use model.apply and its variables."
    )


def _get(obj: Any, key: Any) -> Any:
    return getattr(obj, key) if isinstance(key, str) and hasattr(obj, key) else obj[key]


def _set(obj: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and hasattr(obj, key):
        setattr(obj, key, value)
    else:
        obj[key] = value


class _NNXApply:
    """``apply`` of an NNX module (see :class:`Functional`), with layer taps (:func:`bnjax.taps.run_tapped`) and
    the batch-norm access of precise BN (:class:`bnjax.precise.BNTaps`)."""

    framework = Framework("flax.nnx", nnx.Module, (nnx.Linear, nnx.Conv), -1)

    def __init__(self, graphdef, params, stats, rest, call):
        self.graphdef, self.params, self.stats, self.rest = graphdef, params, stats, rest
        self.call = call
        self.shapes = {
            "params": tree_shapes(nnx.to_pure_dict(params)),
            "batch_stats": tree_shapes(nnx.to_pure_dict(stats)),
        }

    @classmethod
    def functional(cls, model: nnx.Module, call) -> Functional:
        graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)  # type: ignore[misc]
        apply = cls(graphdef, params, stats, rest, call or (lambda m, x: m(x)))
        variables = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}
        return Functional(apply, variables, apply.merge)

    def merge(self, variables: dict[str, PyTree]) -> nnx.Module:
        """A new module holding ``variables`` (the templates from ``nnx.split`` are copied, not changed)."""
        check_variables(variables, self.shapes, "as_functional(nnx_model)")
        params = jax.tree.map(lambda v: v, self.params)
        nnx.replace_by_pure_dict(params, variables["params"])
        stats = jax.tree.map(lambda v: v, self.stats)
        nnx.replace_by_pure_dict(stats, variables.get("batch_stats", {}))
        return nnx.merge(self.graphdef, params, stats, self.rest)

    def __call__(self, variables, inputs, *, train: bool, mutable: Any = False):
        return self.run_tapped(_select_none, variables, inputs, train=train, mutable=mutable).outputs

    def run_tapped(self, select, variables, inputs, *, train: bool, mutable: Any = False) -> TappedRun:
        """The forward pass with each callable submodule that ``select(path, layer)`` picks wrapped in a
        :class:`_Tap` that records its input; the wrappers are removed before the state is read back."""
        check_bool(train, "train")
        model = self.merge(variables)
        check_stats_mutable(train, mutable, variables.get("batch_stats", {}), "as_functional(nnx_model)")
        if train:
            model.train()
        else:
            model.eval()
        nodes = [(p, n) for p, n in nnx.iter_graph(model) if p and isinstance(n, nnx.Module) and callable(n)]
        calls: list[LayerCall] = []
        wrapped = []
        for i in wrapped_order([p for p, _ in nodes]):
            path, layer = nodes[i]
            if not select(path, layer):
                continue
            parent = model
            for key in path[:-1]:
                parent = _get(parent, key)
            record = functools.partial(_record, calls, path, layer)
            _set(parent, path[-1], _Tap(cast(nnx.Module, layer), record))
            wrapped.append((parent, path[-1], layer))
        try:
            outputs = self.call(model, inputs)
        finally:
            for parent, key, layer in reversed(wrapped):
                _set(parent, key, layer)
        if mutable:
            outputs = (outputs, {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))})
        return TappedRun(outputs, tuple(calls), tuple(p for p, _ in nodes))

    # Batch-norm access for bnjax.precise_batch_stats.

    def is_batch_norm(self, path: tuple, layer: Any) -> bool:
        return isinstance(layer, NNX_BATCH_NORM_TYPES)

    def bn_axis(self, layer: Any) -> Any:
        return layer.axis

    def write_bn_stats(self, batch_stats, path: tuple, acc: Moments):
        """A copy of ``batch_stats`` with layer ``path``'s population statistics from ``acc``."""
        return write_dict_stats(batch_stats, path, acc)


def _select_none(path: tuple, layer: Any) -> bool:
    return False


def _record(calls: list[LayerCall], path: tuple, layer: Any, x: Any, kwargs: dict) -> None:
    calls.append(LayerCall(path, layer, x, dict(kwargs)))


class _Tap(nnx.Module):
    """Calls ``on_input(x, kwargs)``, then the wrapped layer (used only on a throwaway merged copy). Other
    attributes are the layer's."""

    def __init__(self, layer: nnx.Module, on_input: Callable[[Any, dict], None]):
        self.layer = layer
        self.on_input = on_input

    def __call__(self, x, *args, **kwargs):
        self.on_input(x, kwargs)
        return self.layer(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("layer", "on_input"):
            raise AttributeError(name)
        return getattr(self.layer, name)
