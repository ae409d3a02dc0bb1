"""``bnjax.equinox.BatchNorm``: a drop-in for ``equinox.nn.BatchNorm`` over :func:`bnjax.batch_norm`.

Importing this module imports Equinox (the optional ``equinox`` extra); ``import bnjax`` does not.

Differences from ``eqx.nn.BatchNorm`` (equinox 0.13), each a reported problem of it:

- Training always normalizes with the batch statistics (Equinox's ``mode="batch"``); ``mode="ema"``, which
  normalizes training batches with running averages and destabilizes training (equinox#659), is rejected.
- The running estimates are zero-debiased exactly: after ``c`` training batches they are the
  ``momentum``-weighted average of the ``c`` batch statistics, weights normalized to sum to 1. Equinox's
  ``mode="batch"`` starts its variance average at 1 and divides it by ``1 - momentum**c`` as if it had
  started at 0, so its inference variance is too large by ``momentum**c / (1 - momentum**c)`` (99 after one
  batch with ``momentum=0.99``).
- ``axis_name`` is a static field (equinox#1074): the module's leaves are arrays and the ``inference`` flag
  only, so ``jax.device_put`` and friends accept it. A list of names is stored as a tuple.
- Statistics are bnjax's exact count-weighted merge across the named axes, computed in at least float32;
  nested ``vmap``s are handled by naming every mapped axis in ``axis_name`` (a tuple), see the guide
  ``docs/guides/equinox_and_nnx.md`` for the nested-``vmap`` patterns of equinox#707.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax._validate import check_bool, check_scalar, check_stats_mutable, check_variables, tree_shapes
from bnjax.batchnorm import BatchNormState, batch_norm
from bnjax.statistics import Moments, Sync, check_sync
from bnjax.taps import Framework, LayerCall, TappedRun, wrapped_order

__all__ = ["BatchNorm", "functional"]


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization of one example's channels, statistics pooled over named ``vmap``/``pmap`` axes.

    Same constructor and call as ``equinox.nn.BatchNorm``: call it on a single example of shape
    ``(input_size, dim_1, ..., dim_N)`` (channels first) inside ``jax.vmap(..., axis_name=...)`` (or
    ``pmap``) over the batch; per channel, the mean and variance are taken over ``dim_1..dim_N`` and every
    example of the named axes. ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Fields:

    - ``weight``, ``bias``: ``dtype[input_size]`` channelwise affine parameters, or None
      (``channelwise_affine=False``).
    - ``state_index``: ``eqx.nn.StateIndex`` of a :class:`bnjax.BatchNormState` ``(mean, var, count)``:
      ``mean``, ``var`` are ``dtype[input_size]``, the zero-debiased running averages of the batch means and
      (biased) variances, used at inference (0 and 1 before the first training batch); ``count`` is
      ``int32[]``, the training batches seen.
    - ``axis_name``: the named axis, or tuple of names, statistics are pooled over (static).
    - ``inference``: use the running averages instead of the batch statistics (``eqx.nn.inference_mode``).
    - ``input_size``, ``eps``, ``channelwise_affine``, ``momentum``, ``mode``, ``sync``: static
      hyper-parameters.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    axis_name: Hashable | tuple[Hashable, ...] = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Literal["batch"] = eqx.field(static=True)
    sync: Sync = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: Literal["batch"] = "batch",
        *,
        sync: Sync = "auto",
    ):
        """**Arguments** (as ``eqx.nn.BatchNorm``):

        - ``input_size``: number of channels (the size of axis 0 of each example).
        - ``axis_name``: the name given to ``jax.vmap``/``jax.pmap`` over the batch, or a tuple/list of
          names (nested ``vmap``s, or ``pmap`` over ``vmap``) to pool statistics over all of them.
        - ``eps``: added to the variance; a finite number > 0.
        - ``channelwise_affine``: learn ``weight`` (ones) and ``bias`` (zeros).
        - ``momentum``: weight on the previous running average, in ``[0, 1)``.
        - ``inference``: normalize with the running averages (toggled by ``eqx.nn.inference_mode``).
        - ``dtype``: dtype of ``weight``, ``bias`` and the running averages; default float32 (float64 with
          ``jax_enable_x64``).
        - ``mode``: only ``"batch"`` (batch statistics in training); ``"ema"`` is rejected (equinox#659).
        - ``sync``: the cross-device merge of :func:`bnjax.batch_norm` (keyword only; bnjax's addition).
        """
        if mode != "batch":
            raise ValueError(
                f"mode={mode!r} is not supported: bnjax.equinox.BatchNorm always normalizes training batches "
                "with their own statistics (Equinox's mode='batch'). mode='ema' normalizes them with running "
                "averages, which blocks the gradient through the batch statistics and destabilizes training "
                "(equinox#659). Use mode='batch' (the default)."
            )
        if isinstance(input_size, (bool, np.bool_)) or not isinstance(input_size, (int, np.integer)) or input_size < 1:
            raise ValueError(f"input_size must be a positive int (the number of channels), got {input_size!r}.")
        input_size = int(input_size)
        check_scalar(eps, "eps", low=0.0, low_open=True, hint=" It keeps 1/sqrt(var + eps) finite.")
        check_scalar(
            momentum,
            "momentum",
            low=0.0,
            high=1.0,
            high_open=True,
            hint=" It is the weight on the previous running average; 1 would never update it.",
        )
        check_sync(sync)
        if isinstance(axis_name, list):
            axis_name = tuple(axis_name)
        try:
            hash(axis_name)
        except TypeError:
            raise TypeError(
                f"axis_name must be a hashable name or a tuple of names (as passed to jax.vmap's axis_name), "
                f"got {axis_name!r}."
            ) from None
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"dtype (of weight, bias and the running averages) must be a real float dtype, got {np.dtype(dtype)}."
            )
        shape = (input_size,)
        self.weight = jnp.ones(shape, dtype) if channelwise_affine else None
        self.bias = jnp.zeros(shape, dtype) if channelwise_affine else None
        self.state_index = eqx.nn.StateIndex(
            BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.zeros((), jnp.int32))
        )
        self.inference = inference
        self.axis_name = axis_name
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.sync = sync

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalize one example ``x`` of shape ``(input_size, dim_1, ..., dim_N)``.

        ``key`` is ignored (Equinox API). ``inference`` overrides ``self.inference`` when not None. Returns
        ``(y, state)``: ``y`` of ``x``'s shape, in ``x``'s dtype promoted with the parameters'; in training
        ``state`` holds the updated running averages, the same value on every example of the named axes
        (unmapped, so ``out_axes=None`` accepts it). Raises a ValueError naming the fix when ``x`` has the
        wrong channel count or ``axis_name`` is not bound by an enclosing ``vmap``/``pmap`` (training only).
        """
        del key
        if inference is None:
            inference = self.inference
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] != self.input_size:
            hint = ""
            if x.ndim >= 2 and x.shape[1] == self.input_size:
                hint = (
                    " It looks like a batch: BatchNorm takes one example, so wrap the call in "
                    f"jax.vmap(..., axis_name={self.axis_name!r})."
                )
            raise ValueError(
                f"BatchNorm(input_size={self.input_size}) expects one example of shape (input_size, ...) "
                f"with channels on axis 0, got shape {x.shape}.{hint}"
            )
        running = state.get(self.state_index)
        y, new = batch_norm(
            x[None],
            self.weight,
            self.bias,
            running,
            train=not inference,
            axis=1,
            momentum=self._debiased_momentum(running.count),  # type: ignore[arg-type]  # a traced weight
            epsilon=self.eps,
            axis_name=None if inference else self.axis_name,
            sync=self.sync,
        )
        if not inference:
            state = state.set(self.state_index, jax.tree.map(lax.stop_gradient, new))
        return y[0], state

    def _debiased_momentum(self, count: jax.Array) -> jax.Array | float:
        """Weight on the old average that keeps it the normalized EMA of the batches seen.

        With ``c = count + 1`` batches, ``avg_c = (m (1 - m^(c-1)) avg_(c-1) + (1 - m) batch_c) / (1 - m^c)``:
        the first batch replaces the initial (0, 1) outright and the weights tend to ``m``. ``1 - m^c`` is
        formed with ``expm1`` so that it stays accurate for ``m`` near 1.
        """
        m = self.momentum
        if m == 0:
            return 0.0
        c = (count + 1).astype(jnp.float32)
        log_m = math.log(m)
        return m * jnp.expm1((c - 1) * log_m) / jnp.expm1(c * log_m)


def functional(model: eqx.Module, state: eqx.nn.State, *, call=None, axis_name: Any = "batch"):
    """:func:`bnjax.as_functional` for Equinox: ``(model, state)`` as a linen-style ``(apply, variables)``.

    ``variables = {"params": eqx.partition(model, eqx.is_inexact_array)[0], "batch_stats": state}``;
    ``apply(variables, inputs, *, train, mutable=False)`` runs ``call(model, example, state)`` (default
    ``model(example, state)``) under ``jax.vmap(..., axis_name=axis_name)`` over ``inputs``' leading axis, with
    ``eqx.nn.inference_mode(model, not train)``. See :class:`bnjax.adapters.Functional`.
    """
    from bnjax.adapters import Functional

    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"as_functional(equinox_model, state): state must be the model's eqx.nn.State, got "
            f"{type(state).__name__}. Build both with eqx.nn.make_with_state(Model)(...)."
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    variables = {"params": params, "batch_stats": state}
    apply = _EquinoxApply(static, call or (lambda m, x, s: m(x, s)), axis_name, variables)
    return Functional(apply, variables, apply.rebuild)


class _EquinoxApply:
    """``apply`` of an Equinox model (see :class:`bnjax.adapters.Functional`), with layer taps
    (:func:`bnjax.taps.run_tapped`) and the batch-norm access of precise BN (:class:`bnjax.precise.BNTaps`)."""

    framework = Framework("equinox", eqx.Module, (eqx.nn.Linear, eqx.nn.Conv), 1)

    def __init__(self, static, call, axis_name, variables):
        self.static, self.call, self.axis_name = static, call, axis_name
        self.shapes = {name: tree_shapes(tree) for name, tree in variables.items()}

    def rebuild(self, variables):
        check_variables(variables, self.shapes, "as_functional(equinox_model, state)")
        return eqx.combine(variables["params"], self.static), variables["batch_stats"]

    def __call__(self, variables, inputs, *, train: bool, mutable: Any = False):
        return self.run_tapped(_select_none, variables, inputs, train=train, mutable=mutable).outputs

    def run_tapped(self, select, variables, inputs, *, train: bool, mutable: Any = False) -> TappedRun:
        """The vmapped forward pass with each callable submodule that ``select(path, layer)`` picks wrapped in
        a :class:`_Tap`. The inputs are recorded per example inside the ``vmap`` and returned by it, stacked."""
        check_bool(train, "train")
        model, state = self.rebuild(variables)
        check_stats_mutable(train, mutable, state, "as_functional(equinox_model, state)")
        model = eqx.nn.inference_mode(model, value=not train)
        nodes = _submodules(model)
        found: list[tuple[tuple[str, ...], Any, bool]] = []  # (path, layer, input is an array), in call order
        per_example_inputs: list[jax.Array] = []

        def record(path, layer, x):
            found.append((path, layer, isinstance(x, jax.Array)))
            if isinstance(x, jax.Array):
                per_example_inputs.append(x)

        for i in wrapped_order([path for path, _, _ in nodes]):
            path, keypath, layer = nodes[i]
            if select(path, layer):
                tap_type = _StatefulTap if isinstance(layer, eqx.nn.StatefulLayer) else _Tap
                tap = tap_type(layer, functools.partial(record, path, layer))
                model = eqx.tree_at(functools.partial(_at, keypath=keypath), model, tap)

        def per_example(x, state):
            return self.call(model, x, state), list(per_example_inputs)

        (outputs, state), stacked = jax.vmap(
            per_example, axis_name=self.axis_name, in_axes=(0, None), out_axes=((0, None), 0)
        )(inputs, state)
        stacked_inputs = iter(stacked)
        calls = tuple(
            LayerCall(path, layer, next(stacked_inputs) if is_array else None, {}) for path, layer, is_array in found
        )
        if mutable:
            outputs = (outputs, {"batch_stats": state})
        return TappedRun(outputs, calls, tuple(path for path, _, _ in nodes))

    # Batch-norm access for bnjax.precise_batch_stats.

    def is_batch_norm(self, path: tuple[str, ...], layer: Any) -> bool:
        if isinstance(layer, eqx.nn.BatchNorm):
            raise TypeError(
                f"precise statistics of an Equinox model need bnjax.equinox.BatchNorm layers; the layer at "
                f"{'/'.join(path)} is an eqx.nn.BatchNorm (its running averages are debiased with a running batch "
                "count, so population statistics cannot be written into it)."
            )
        return isinstance(layer, BatchNorm)

    def bn_axis(self, layer: Any) -> int:
        return 1  # channels first per example, behind the stacked batch axis

    def write_bn_stats(self, state, path: tuple[str, ...], acc: Moments) -> eqx.nn.State:
        (layer,) = [layer for p, _, layer in _submodules(self.static) if p == path]
        state = jax.tree.map(lambda v: v, state)  # a copy: State.set invalidates the state it is called on
        old = state.get(layer.state_index)
        mean = acc.mean.reshape(old.mean.shape).astype(old.mean.dtype)
        var = (acc.m2 / jnp.maximum(acc.count, 1.0)).reshape(old.var.shape).astype(old.var.dtype)
        return state.set(layer.state_index, old._replace(mean=mean, var=var))


def _select_none(path: tuple, layer: Any) -> bool:
    return False


def _submodules(tree: Any, prefix: tuple = ()) -> list[tuple[tuple[str, ...], tuple, Any]]:
    """``(path, key path, module)`` of every callable ``eqx.Module`` inside ``tree`` (not ``tree`` itself), in
    pytree order, parents before their children; ``path`` holds the keys as strings."""
    found: list[tuple[tuple[str, ...], tuple, Any]] = []
    children = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda n: n is not tree and isinstance(n, eqx.Module))
    for keypath, node in children[0]:
        if node is not tree and isinstance(node, eqx.Module):
            full = prefix + tuple(keypath)
            if callable(node):
                found.append((tuple(_key_str(k) for k in full), full, node))
            found.extend(_submodules(node, full))
    return found


def _key_str(key: Any) -> str:
    return str(getattr(key, "name", getattr(key, "idx", getattr(key, "key", key))))


class _Tap(eqx.Module):
    """Calls ``on_input(x)``, then the wrapped layer; other attributes are the layer's."""

    layer: Any
    on_input: Any = eqx.field(static=True)

    def __call__(self, x, *args, **kwargs):
        self.on_input(x)
        return self.layer(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("layer", "on_input"):
            raise AttributeError(name)
        return getattr(self.layer, name)


class _StatefulTap(_Tap, eqx.nn.StatefulLayer):
    """A :class:`_Tap` of a stateful layer (``eqx.nn.Sequential`` passes the state to ``StatefulLayer``s)."""

    def is_stateful(self) -> bool:
        return self.layer.is_stateful()


def _at(tree, keypath):
    for k in keypath:
        if hasattr(k, "name"):
            tree = getattr(tree, k.name)
        else:
            tree = tree[getattr(k, "idx", getattr(k, "key", None))]
    return tree
