"""Loss slices: linear interpolation between two parameter sets, and 1-D / 2-D slices along directions,
with Li et al.'s (2018) filter-normalized random directions.

Filter normalization (Li, Xu, Taylor, Studer, Goldstein 2018): a random Gaussian direction ``d`` is rescaled
filter by filter, ``d_f <- d_f * ||w_f|| / (||d_f|| + 1e-10)``, so that the slice is comparable across
networks whose weights differ in scale (BN makes the loss invariant to the scale of the weights before it).
A *filter* of a parameter array with two or more axes is the sub-array at one index of ``filter_axis``
(default -1: the output feature of Flax ``Dense`` kernels ``(in, out)`` and ``Conv`` kernels
``(..., in, out)``; PyTorch's layouts have it first). Arrays with at most one axis (biases, BN scale and
bias) are set to zero by default, as in Li et al.'s plots (``ignore='biasbn'``), or set equal to the
parameters (``bias_bn="weights"``, their other option).

Every slice is one jitted evaluation of ``loss_fn`` at all grid points, vectorized or in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bnjax._validate import check_key, check_like, check_params, check_values
from bnjax.landscape._evaluate import map_chunked

PyTree = Any
BiasBN = Literal["zero", "weights"]


def filter_normalize(direction: PyTree, params: PyTree, *, filter_axis: int = -1, bias_bn: BiasBN = "zero") -> PyTree:
    """Rescale each filter of ``direction`` to the norm of the same filter of ``params`` (see module doc).

    Args:
      direction: a pytree like ``params``.
      params: the parameters whose filter norms are matched.
      filter_axis: the axis indexing filters in arrays with two or more axes.
      bias_bn: ``"zero"`` zeroes arrays with at most one axis; ``"weights"`` sets them to ``params``.

    Returns:
      A pytree like ``params``, in ``direction``'s dtypes.
    """
    check_like(direction, params, name="direction", same_dtype=False)
    if isinstance(filter_axis, bool) or not isinstance(filter_axis, int):
        raise ValueError(f"`filter_axis` must be an int (the axis indexing filters); got {filter_axis!r}.")
    if bias_bn not in ("zero", "weights"):
        raise ValueError(f'`bias_bn` must be "zero" or "weights"; got {bias_bn!r}.')

    def one(d: jax.Array, w: jax.Array) -> jax.Array:
        if d.ndim <= 1:
            return jnp.zeros_like(d) if bias_bn == "zero" else w.astype(d.dtype)
        if not -d.ndim <= filter_axis < d.ndim:
            raise ValueError(f"`filter_axis`={filter_axis} is out of range for a parameter of shape {d.shape}.")
        axes = tuple(a for a in range(d.ndim) if a != filter_axis % d.ndim)
        norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32)), axis=axes, keepdims=True))
        return (d * (norm(w) / (norm(d) + 1e-10))).astype(d.dtype)

    return jax.tree.map(one, direction, params)


def random_direction(key: jax.Array, params: PyTree, *, filter_axis: int = -1, bias_bn: BiasBN = "zero") -> PyTree:
    """A standard-normal direction like ``params``, filter-normalized (:func:`filter_normalize`)."""
    check_key(key)
    check_params(params)
    direction = otu.tree_random_like(key, params, jax.random.normal)
    return filter_normalize(direction, params, filter_axis=filter_axis, bias_bn=bias_bn)


def _coords(values: Any, name: str) -> jax.Array:
    values = jnp.asarray(values)
    if values.ndim != 1 or values.shape[0] == 0 or not jnp.issubdtype(values.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a non-empty 1-D float array of slice coordinates; got shape {values.shape}, "
            f"dtype {values.dtype}. Use e.g. jnp.linspace(-1.0, 1.0, 21)."
        )
    check_values(values, name)
    return values


def _losses_along(
    loss_fn: Callable[..., jax.Array],
    origin: PyTree,
    directions: Sequence[PyTree],
    coefficients: jax.Array,
    batch: PyTree,
    args: tuple[Any, ...],
    chunk_size: int | None,
) -> jax.Array:
    """float[K]: ``loss_fn(origin + sum_j coefficients[k, j] * directions[j], batch, *args)`` for every k."""
    for i, d in enumerate(directions):
        check_like(d, origin, name=f"direction {i}", same_dtype=False)

    def at(c: jax.Array) -> jax.Array:
        point = origin
        for j, d in enumerate(directions):
            point = jax.tree.map(lambda p, v: (p + c[j] * v).astype(p.dtype), point, d)
        loss = loss_fn(point, batch, *args)
        if (
            not hasattr(loss, "shape")
            or jnp.shape(loss) != ()
            or not jnp.issubdtype(jnp.result_type(loss), jnp.inexact)
        ):
            seen = f"shape {jnp.shape(loss)}, dtype {jnp.result_type(loss)}" if hasattr(loss, "shape") else type(loss)
            raise TypeError(
                f"`loss_fn` must return a scalar float loss; got {seen}. Average a per-example loss, and drop any "
                "auxiliary output (e.g. lambda p, b: loss_fn(p, b)[0])."
            )
        return loss

    return map_chunked(at, coefficients, chunk_size)


def interpolation(
    loss_fn: Callable[..., jax.Array],
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *args: Any,
    alphas: jax.Array,
    chunk_size: int | None = None,
) -> jax.Array:
    """float[K]: ``L((1 - alpha) * params_a + alpha * params_b)`` for each ``alpha`` (0: a, 1: b).

    ``loss_fn(params, batch, *args) -> scalar``; ``alphas`` float[K] may extend beyond [0, 1].
    """
    check_like(params_b, params_a, name="params_b", ref="params_a", same_dtype=False)
    alphas = _coords(alphas, "alphas")
    return _losses_along(
        loss_fn, params_a, [otu.tree_sub(params_b, params_a)], alphas[:, None], batch, args, chunk_size
    )


def slice_1d(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batch: PyTree,
    *args: Any,
    direction: PyTree,
    alphas: jax.Array,
    chunk_size: int | None = None,
) -> jax.Array:
    """float[K]: ``L(params + alpha * direction)`` for each ``alpha`` in ``alphas`` (float[K])."""
    alphas = _coords(alphas, "alphas")
    return _losses_along(loss_fn, params, [direction], alphas[:, None], batch, args, chunk_size)


def slice_2d(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batch: PyTree,
    *args: Any,
    directions: tuple[PyTree, PyTree],
    alphas: jax.Array,
    betas: jax.Array,
    chunk_size: int | None = None,
) -> jax.Array:
    """float[A, B]: ``L(params + alpha_a * directions[0] + beta_b * directions[1])`` on the grid
    ``alphas`` (float[A]) x ``betas`` (float[B]); ``chunk_size`` counts grid points."""
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
        raise ValueError(f"`directions` must be a pair (d_x, d_y) of pytrees like `params`; got {type(directions)}.")
    alphas, betas = _coords(alphas, "alphas"), _coords(betas, "betas")
    grid = jnp.stack(jnp.meshgrid(alphas, betas, indexing="ij"), axis=-1).reshape(-1, 2)
    losses = _losses_along(loss_fn, params, list(directions), grid, batch, args, chunk_size)
    return losses.reshape(alphas.shape[0], betas.shape[0])
