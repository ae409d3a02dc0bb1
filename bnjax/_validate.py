"""Trace-time input checks shared by the curvature and landscape modules (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_like(vector: Any, params: Any, *, name: str = "vector", ref: str = "params") -> None:
    """Raise if ``vector`` does not have the pytree structure, shapes and float dtypes of ``params``.

    Runs on abstract values, so it fails at trace time inside ``jit``.
    """
    p_leaves, p_def = jax.tree.flatten(params)
    v_leaves, v_def = jax.tree.flatten(vector)
    if p_def != v_def:
        raise ValueError(
            f"`{name}` must have the same pytree structure as `{ref}`; got\n  {name}: {v_def}\n  {ref}: {p_def}\n"
            f"Build it with e.g. `jax.tree.map(jnp.zeros_like, {ref})`."
        )
    for i, (p, v) in enumerate(zip(p_leaves, v_leaves)):
        if jnp.shape(p) != jnp.shape(v):
            raise ValueError(
                f"`{name}` leaf {i} has shape {jnp.shape(v)} but the matching `{ref}` leaf has shape "
                f"{jnp.shape(p)}; every leaf of `{name}` must match `{ref}` exactly."
            )
        if not jnp.issubdtype(jnp.result_type(v), jnp.inexact):
            raise TypeError(f"`{name}` leaf {i} has dtype {jnp.result_type(v)}; a floating dtype is required.")
    if not p_leaves:
        raise ValueError(f"`{ref}` has no array leaves; there is nothing to differentiate.")


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int, raising if it is not a positive (static) integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive Python int (it fixes array shapes); got {value!r}.")
    return value
