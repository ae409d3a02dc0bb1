"""Santurkar et al.'s (2018, §3.1) smoothness measures along the negative gradient.

At parameters ``w`` with gradient ``g = grad L(w)`` on one minibatch (the same minibatch for every
evaluation), and step sizes ``eta_1..eta_K``:

- loss landscape variation: ``max_k L(w - eta_k g) - min_k L(w - eta_k g)``;
- gradient predictiveness: ``max_k d_k - min_k d_k`` with ``d_k = ||g - grad L(w - eta_k g)||_2``;
- effective beta-smoothness: ``max_k d_k / ||eta_k g||_2``.

Default grid: ``eta = learning_rate * linspace(0.5, 4, 8)``. The paper used ``[0.5, 4] x`` the learning rate
(0.05 to 0.4 at lr 0.1, the top just below where their no-BN network diverged) without stating a grid size;
8 points put the smallest step at half the training step and space the points by half a training step.
All step sizes are evaluated in one vectorized call (or in chunks with ``chunk_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from bnjax._validate import check_params, check_scalar, check_values
from bnjax.landscape._evaluate import map_chunked

PyTree = Any

DEFAULT_STEP_SIZE_RANGE = (0.5, 4.0)
DEFAULT_NUM_STEP_SIZES = 8
_LR_HINT = " The measures step along -grad L; a step of 0 or below measures nothing or goes uphill."


class SmoothnessResult(NamedTuple):
    """Smoothness measures at one point of training (a pytree; passes through ``jit``).

    Fields (float32 unless the parameters are wider; ``K`` step sizes):
      loss_variation: [] spread (max - min) of ``losses``.
      gradient_predictiveness: [] spread (max - min) of ``grad_distances``.
      beta_smoothness: [] ``max_k grad_distances[k] / (step_sizes[k] * grad_norm)`` (0 where ``g = 0``).
      loss: [] ``L(w)``.
      grad_norm: [] ``||g||_2``.
      step_sizes: [K] the step sizes ``eta_k``.
      losses: [K] ``L(w - eta_k g)``.
      grad_distances: [K] ``||g - grad L(w - eta_k g)||_2``.
    """

    loss_variation: jax.Array
    gradient_predictiveness: jax.Array
    beta_smoothness: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    step_sizes: jax.Array
    losses: jax.Array
    grad_distances: jax.Array


def _norm(tree: PyTree) -> jax.Array:
    """The Euclidean norm of a pytree, accumulated in float32 or wider (a bfloat16 sum of squares loses digits)."""
    sq = [
        jnp.sum(jnp.square(jnp.abs(x.astype(jnp.promote_types(x.dtype, jnp.float32))))) for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(sq[1:], sq[0]))


def step_size_grid(
    learning_rate: float | jax.Array,
    *,
    low: float = DEFAULT_STEP_SIZE_RANGE[0],
    high: float = DEFAULT_STEP_SIZE_RANGE[1],
    num: int = DEFAULT_NUM_STEP_SIZES,
) -> jax.Array:
    """``learning_rate * linspace(low, high, num)``: float32[num]. ``learning_rate`` may be traced.

    ``learning_rate`` (when concrete) and ``low`` must be finite and > 0, ``high >= low`` finite.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"`num` must be a positive Python int (it fixes the grid's shape); got {num!r}.")
    check_scalar(learning_rate, "learning_rate", low=0.0, low_open=True, hint=_LR_HINT)
    check_scalar(low, "low", low=0.0, low_open=True, hint=" The grid's smallest multiple of the learning rate.")
    check_scalar(high, "high", low=low, hint=" The grid's largest multiple of the learning rate, at least `low`.")
    return jnp.asarray(learning_rate, jnp.float32) * jnp.linspace(low, high, num, dtype=jnp.float32)


def smoothness(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batch: PyTree,
    *args: Any,
    learning_rate: float | jax.Array | None = None,
    step_sizes: jax.Array | None = None,
    chunk_size: int | None = None,
) -> SmoothnessResult:
    """Loss variation, gradient predictiveness and effective beta-smoothness along ``-grad L(params)``.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> scalar`` (e.g. ``flax_curvature_fns(...).loss_fn`` with
        ``args = (batch_stats,)``); must be deterministic (fix any noise key inside ``batch``).
      params: the current parameters ``w`` (pytree of float arrays).
      batch: the minibatch; every evaluation uses it.
      *args: further arguments of ``loss_fn``, held fixed.
      learning_rate: the training learning rate; the grid is :func:`step_size_grid` of it (0.5 to 4 times
        it, 8 points). May be traced, e.g. from a schedule.
      step_sizes: an explicit float[K] grid of finite step sizes ``>= 0``, at least one ``> 0``, instead of
        ``learning_rate`` (a 0 entry is the reference point ``L(w)`` itself).
      chunk_size: evaluate this many step sizes at a time (``lax.map``); None vectorizes all of them.

    Returns:
      :class:`SmoothnessResult`. Costs ``K + 1`` gradients.
    """
    if (learning_rate is None) == (step_sizes is None):
        raise ValueError(
            "Pass exactly one of `learning_rate` (grid 0.5..4 x learning_rate, 8 points) or `step_sizes` "
            f"(an explicit 1-D grid); got learning_rate={learning_rate!r}, step_sizes="
            f"{'None' if step_sizes is None else jnp.shape(step_sizes)}."
        )
    if learning_rate is not None:
        step_sizes = step_size_grid(learning_rate)
    step_sizes = jnp.asarray(step_sizes)
    if step_sizes.ndim != 1 or step_sizes.shape[0] == 0 or not jnp.issubdtype(step_sizes.dtype, jnp.floating):
        raise ValueError(
            f"`step_sizes` must be a non-empty 1-D float array; got shape {step_sizes.shape}, dtype "
            f"{step_sizes.dtype}. Use e.g. step_size_grid(learning_rate)."
        )
    concrete = check_values(step_sizes, "step_sizes", low=0.0, hint=_LR_HINT)
    if concrete is not None and not np.any(concrete > 0):
        raise ValueError(f"`step_sizes` must include a step > 0; got {concrete.tolist()}.{_LR_HINT}")
    check_params(params)
    value_and_grad = jax.value_and_grad(loss_fn)
    loss, grad = value_and_grad(params, batch, *args)
    grad_norm = _norm(grad)

    def at(eta: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss_eta, grad_eta = value_and_grad(otu.tree_add_scale(params, -eta, grad), batch, *args)
        return loss_eta, _norm(otu.tree_sub(grad, grad_eta))

    losses, distances = map_chunked(at, step_sizes, chunk_size)
    step_norms = step_sizes * grad_norm
    # 0 at a zero step (the reference point, or a zero gradient); a NaN gradient stays NaN (not "smooth").
    ratios = jnp.where(step_norms == 0, 0.0, distances / jnp.where(step_norms == 0, 1.0, step_norms))
    return SmoothnessResult(
        loss_variation=jnp.max(losses) - jnp.min(losses),
        gradient_predictiveness=jnp.max(distances) - jnp.min(distances),
        beta_smoothness=jnp.max(ratios),
        loss=loss,
        grad_norm=grad_norm,
        step_sizes=step_sizes,
        losses=losses,
        grad_distances=distances,
    )
