"""Internal covariate shift in Santurkar et al.'s (2018) sense: how much a layer's gradient changes when the
layers before it take their update step.

For layer ``i`` with parameters ``w_i``: ``G_i = grad_{w_i} L(w_1, ..., w_n)`` and
``G'_i = grad_{w_i} L(w_1 + u_1, ..., w_{i-1} + u_{i-1}, w_i, ..., w_n)`` with the update ``u`` of the
training step (what ``optax.apply_updates(params, u)`` adds), on the same minibatch. Reported per layer:
``||G_i - G'_i||_2`` and ``cos(G_i, G'_i)``.

Layers: ``layers`` lists the top-level keys of the ``params`` dict in order, each entry a key or a tuple of
keys forming one layer (e.g. a Dense and its BatchNorm); every top-level key must belong to exactly one
layer. The order is an argument because a dict's own order does not survive JAX: ``jax.tree.map``,
``optax.apply_updates`` and ``jax.jit`` rebuild dicts with *sorted* keys (``BatchNorm_0, BatchNorm_1,
Dense_0, ...``). :func:`bnjax.landscape.module_call_order` gives the order in which the top-level submodules
are called, for a linen ``model.apply`` and for the ``apply`` of :func:`bnjax.as_functional` (NNX and
Equinox models); for a linen model ``tuple(model.init(...)["params"])`` (creation order) also works when
taken straight from ``init``, outside ``jit``. ``params`` is a dict keyed by layer (linen, and NNX through
:func:`bnjax.as_functional`), or an Equinox model's float leaves, whose layers are its fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax._validate import check_like
from bnjax.landscape._evaluate import map_chunked

PyTree = Any
Layers = Sequence[str | Sequence[str]]


class CovariateShiftResult(NamedTuple):
    """Per-layer covariate shift; entry ``i`` is layer ``i`` of :func:`layer_groups`.

    Fields (float32[L] for ``L`` layers):
      grad_distance: ``||G_i - G'_i||_2``.
      cosine: ``cos(G_i, G'_i)`` (0 where either gradient is 0; NaN where either is non-finite).
      grad_norm: ``||G_i||_2``.
      shifted_grad_norm: ``||G'_i||_2``.
    """

    grad_distance: jax.Array
    cosine: jax.Array
    grad_norm: jax.Array
    shifted_grad_norm: jax.Array


def layer_keys(params: PyTree) -> list[str]:
    """The top-level keys of ``params`` that name its layers, in order: a dict's keys, or the names of the
    fields holding arrays in an object with named fields (an Equinox model, as in ``as_functional``'s
    ``variables["params"]``).

    Raises:
      TypeError: ``params`` is neither (e.g. a list or an array).
    """
    if isinstance(params, Mapping):
        return list(params.keys())
    keys: list[str] = []
    for keypath, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not keypath or not isinstance(keypath[0], jax.tree_util.GetAttrKey):
            raise TypeError(
                "`params` must be keyed by layer name: a dict (e.g. variables['params'] of a Flax model) or a "
                f"model with named fields (an Equinox model); got {type(params).__name__}."
            )
        if keypath[0].name not in keys:
            keys.append(keypath[0].name)
    return keys


def _key_name(key: Any) -> Any:
    """The name of a top-level pytree key (a dict key or a field name)."""
    return key.name if isinstance(key, jax.tree_util.GetAttrKey) else key.key


def layer_groups(params: PyTree, layers: Layers) -> tuple[tuple[str, ...], ...]:
    """The layers as tuples of top-level ``params`` keys, in order, validated (see module docstring).

    Args:
      params: parameters keyed by layer: a dict (e.g. ``variables["params"]`` of a Flax
        model) or an Equinox model's float leaves (``bnjax.as_functional(model, state).variables["params"]``).
      layers: a sequence whose entries are a key or a sequence of keys forming one layer.
    """
    keys = layer_keys(params)
    if keys == ["params"]:
        raise ValueError(
            "`params` has the single top-level key 'params': pass variables['params'], not the whole "
            "Flax variables dict."
        )
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(
            f"`layers` must be a sequence of keys (or of tuples of keys) of `params`, in order; got {layers!r}. "
            "For a model use bnjax.landscape.module_call_order(apply, variables, x, train=False) (a linen "
            "model.apply, or the apply of bnjax.as_functional)."
        )
    bad = [
        g
        for g in layers
        if not isinstance(g, str) and not (isinstance(g, Sequence) and all(isinstance(k, str) for k in g))
    ]
    if bad:
        raise TypeError(
            f"`layers` entries must be keys of `params` (strings) or sequences of them; got {bad[0]!r}. The keys "
            f"are {keys}."
        )
    groups = tuple((g,) if isinstance(g, str) else tuple(g) for g in layers)
    listed = [k for g in groups for k in g]
    unknown = [k for k in listed if k not in keys]
    repeated = sorted({k for k in listed if listed.count(k) > 1})
    missing = [k for k in keys if k not in listed]
    if unknown or repeated or missing or any(not g for g in groups):
        raise ValueError(
            "`layers` must partition the top-level keys of `params` into non-empty groups; "
            f"unknown keys: {unknown}, keys listed twice: {repeated}, keys not listed: {missing}. "
            f"The keys are {keys}."
        )
    return groups


def internal_covariate_shift(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batch: PyTree,
    *args: Any,
    updates: PyTree,
    layers: Layers,
    chunk_size: int | None = None,
) -> CovariateShiftResult:
    """Santurkar et al.'s internal covariate shift of every layer for one training step.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> scalar`` (e.g. ``flax_curvature_fns(...).loss_fn``,
        ``args = (batch_stats,)``; with BN in train mode the batch statistics follow the updated layers).
      params: the parameters before the step, keyed by layer (a dict, or an Equinox
        model's float leaves).
      batch: the minibatch of the step.
      *args: further arguments of ``loss_fn``, held fixed.
      updates: the step's update, a pytree like ``params`` (from ``optimizer.update(grads, opt_state,
        params)`` in optax; the parameters after the step are ``params + updates``).
      layers: the layers in order, as top-level keys of ``params`` or tuples of them (see module docstring;
        :func:`bnjax.landscape.module_call_order` finds them for linen, NNX and Equinox models).
      chunk_size: evaluate this many layers' shifted gradients at a time; None vectorizes all of them.

    Returns:
      :class:`CovariateShiftResult`. Costs one gradient per layer plus one.
    """
    groups = layer_groups(params, layers)
    check_like(updates, params, name="updates", same_dtype=False)
    layer_of = {k: i for i, g in enumerate(groups) for k in g}
    index = jax.tree_util.tree_map_with_path(lambda path, _: layer_of[_key_name(path[0])], params)
    num_layers = len(groups)

    def per_layer(tree: PyTree) -> jax.Array:
        """float32[L]: sum over each layer's leaves of ``tree``'s leaves (already reduced to scalars)."""
        totals = [jnp.zeros((), jnp.float32)] * num_layers
        for i, value in zip(jax.tree.leaves(index), jax.tree.leaves(tree)):
            totals[i] = totals[i] + value.astype(jnp.float32)
        return jnp.stack(totals)

    grad_fn = jax.grad(loss_fn)
    grad = grad_fn(params, batch, *args)
    grad_sq = per_layer(jax.tree.map(lambda g: jnp.sum(g * g), grad))

    def shifted(i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        moved = jax.tree.map(
            lambda w, u, layer: jnp.where(layer < i, (w + u).astype(w.dtype), w), params, updates, index
        )
        g2 = grad_fn(moved, batch, *args)
        dist_sq = per_layer(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), grad, g2))
        dot = per_layer(jax.tree.map(lambda a, b: jnp.sum(a * b), grad, g2))
        sq = per_layer(jax.tree.map(lambda b: jnp.sum(b * b), g2))
        return dist_sq[i], dot[i], sq[i]

    dist_sq, dot, shifted_sq = map_chunked(shifted, jnp.arange(num_layers), chunk_size)
    grad_norm, shifted_norm = jnp.sqrt(grad_sq), jnp.sqrt(shifted_sq)
    denom = grad_norm * shifted_norm
    # 0 where a gradient is exactly 0; NaN stays NaN (a NaN gradient is not "orthogonal").
    cosine = jnp.where(denom == 0, 0.0, dot / jnp.where(denom == 0, 1.0, denom))
    return CovariateShiftResult(jnp.sqrt(dist_sq), cosine, grad_norm, shifted_norm)
