"""Evaluate a function at many points in one call, in chunks (private; shared by every landscape measure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from bnjax._validate import check_positive_int

PyTree = Any


def map_chunked(fn: Callable[[PyTree], PyTree], xs: PyTree, chunk_size: int | None) -> PyTree:
    """``fn`` over the leading axis of ``xs``: one ``vmap`` when ``chunk_size`` is None, else ``lax.map``
    over chunks of ``chunk_size`` points, each chunk vectorized (bounded memory, one compiled loop)."""
    if chunk_size is None:
        return jax.vmap(fn)(xs)
    return lax.map(fn, xs, batch_size=check_positive_int(chunk_size, "chunk_size"))
