"""Trace-time input checks shared by bnjax's modules (private)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_params(params: Any, name: str = "params") -> None:
    """Raise unless ``params`` has array leaves, all floating point (they are differentiated); messages name the
    leaf by its path. Runs on abstract values, so it fails at trace time inside ``jit``."""
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    if not with_path:
        raise ValueError(f"`{name}` has no array leaves; there is nothing to differentiate.")
    for path, p in with_path:
        if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(p)}; every leaf of `{name}` "
                "is differentiated, so all must be floating point. Pass integer state (step counters, "
                "indices) through the function's other arguments instead."
            )


def check_like(vector: Any, params: Any, *, name: str = "vector", ref: str = "params", same_dtype: bool = True) -> None:
    """Raise if ``vector`` does not have the pytree structure, shapes and float dtypes of ``params``.

    ``params``' leaves must be floating point (they are differentiated); with ``same_dtype`` each leaf of
    ``vector`` must have its parameter's dtype (a JVP requires it). Messages name the leaf by its path.
    Runs on abstract values, so it fails at trace time inside ``jit``.
    """
    check_params(params, ref)
    p_with_path, p_def = jax.tree_util.tree_flatten_with_path(params)
    v_leaves, v_def = jax.tree.flatten(vector)
    if p_def != v_def:  # type: ignore[operator]  # mypy cannot resolve jaxlib's PyTreeDef stub
        raise ValueError(
            f"`{name}` must have the same pytree structure as `{ref}`; got\n  {name}: {v_def}\n  {ref}: {p_def}\n"
            f"Build it with e.g. `jax.tree.map(jnp.zeros_like, {ref})`."
        )
    for (path, p), v in zip(p_with_path, v_leaves):
        where = jax.tree_util.keystr(path)
        if jnp.shape(p) != jnp.shape(v):
            raise ValueError(
                f"`{name}` leaf {where} has shape {jnp.shape(v)} but the matching `{ref}` leaf has shape "
                f"{jnp.shape(p)}; every leaf of `{name}` must match `{ref}` exactly."
            )
        v_dtype, p_dtype = jnp.result_type(v), jnp.result_type(p)
        if not jnp.issubdtype(v_dtype, jnp.inexact):
            raise TypeError(f"`{name}` leaf {where} has dtype {v_dtype}; a floating dtype is required.")
        if same_dtype and v_dtype != p_dtype:
            raise TypeError(
                f"`{name}` leaf {where} has dtype {v_dtype} but the matching `{ref}` leaf has {p_dtype}; they "
                f"must be equal. Build `{name}` from `{ref}` (e.g. `jax.tree.map(jnp.zeros_like, {ref})`) or "
                "cast it leaf by leaf."
            )


def check_key(key: Any, name: str = "key") -> None:
    """Raise unless ``key`` is one PRNG key: a typed key array of shape ``()`` (``jax.random.key``) or a raw
    ``uint32`` key of shape ``(2,)`` (``jax.random.PRNGKey``). Works on abstract values (inside ``jit``)."""
    dtype, shape = getattr(key, "dtype", None), np.shape(key)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
        raise ValueError(
            f"`{name}` must be a single PRNG key; got a key array of shape {shape}. Pass one key (e.g. "
            f"`jax.random.key(0)`, or one entry of `jax.random.split(...)`)."
        )
    if dtype is not None and np.dtype(dtype) == np.uint32 and shape == (2,):
        return
    shown = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else repr(key)
    raise TypeError(f"`{name}` must be a PRNG key such as `jax.random.key(0)`; got {shown}.")


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as a Python int, raising if it is not a positive (static) integer (NumPy's too)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive Python int (it fixes array shapes); got {value!r}.")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a Python bool (a static flag; NumPy's ``bool_`` too), else a ``TypeError`` naming the argument
    (with a hint when the value is traced: a flag that selects the computation cannot be)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    hint = (
        " A traced flag cannot select the computation: mark it static (static_argnames)."
        if isinstance(value, jax.core.Tracer)
        else ""
    )
    raise TypeError(f"`{name}` must be True or False (a static Python bool); got {value!r}.{hint}")


def check_stats_mutable(train: bool, mutable: Any, batch_stats: Any, owner: str) -> None:
    """flax.linen's rule for ``apply``: a train-mode call that updates running statistics must ask for them
    (``mutable`` True, ``"batch_stats"`` or a collection list naming it), else a ``ValueError``: returning the
    outputs alone would drop the updated statistics without a word."""
    if not train or not jax.tree.leaves(batch_stats):
        return
    if mutable is True or mutable == "batch_stats":
        return
    if isinstance(mutable, (list, tuple, set, frozenset)) and "batch_stats" in mutable:
        return
    raise ValueError(
        f"{owner}: apply(..., train=True) updates the running statistics, but mutable={mutable!r} does not ask "
        "for 'batch_stats', so they would be dropped. Pass mutable=['batch_stats'] and take (outputs, "
        "{'batch_stats': updated}) as flax.linen's Module.apply does (it raises here too), or train=False."
    )


def check_float_tree(tree: Any, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``tree`` is a nonempty pytree of real float arrays."""
    leaves = jax.tree.leaves(tree)
    if (
        not leaves
        or sum(np.size(x) for x in leaves) == 0
        or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves)
    ):
        raise ValueError(
            f"`{name}` must be a nonempty pytree of float arrays like the parameters; got "
            f"{jax.tree.map(lambda x: (jnp.shape(x), str(jnp.result_type(x))), tree)}."
        )


def check_scalar(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    hint: str = "",
) -> None:
    """Raise if a concrete ``value`` is not a finite real scalar in the interval given by ``low``/``high``.

    ``low_open``/``high_open`` exclude the bound itself; ``finite=False`` admits infinities (never NaN). Traced
    scalars (e.g. a learning rate from a schedule inside ``jit``) cannot be checked at trace time and pass;
    non-scalars are rejected either way. The
    message names the argument, the value seen and the valid range, then ``hint``.
    """
    interval = (
        ("(" if low_open or low is None else "[")
        + ("-inf" if low is None else f"{low:g}")
        + ", "
        + ("inf" if high is None else f"{high:g}")
        + (")" if high_open or high is None else "]")
    )
    if isinstance(value, (bool, str)) or value is None or np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a real scalar in {interval}; got {value!r}.{hint}")
    try:
        v = float(value)
    except jax.errors.ConcretizationTypeError:
        return  # traced: checked by the caller's own semantics at run time, if at all
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real scalar in {interval}; got {value!r}.{hint}") from None
    inside = math.isfinite(v) if finite else not math.isnan(v)
    if low is not None:
        inside = inside and (v > low if low_open else v >= low)
    if high is not None:
        inside = inside and (v < high if high_open else v <= high)
    shown = value if isinstance(value, (int, float)) else v
    if not inside:
        kind = "finite number" if finite else "number"
        raise ValueError(f"`{name}`={shown!r} is out of range: expected a {kind} in {interval}.{hint}")
    if finite and abs(v) > FLOAT32_MAX:
        raise ValueError(
            f"`{name}`={shown!r} is beyond float32's range (|value| <= 3.4e38): it would become inf in float32 "
            f"computations.{hint}"
        )


FLOAT32_MAX = float(np.finfo(np.float32).max)  # beyond it a value becomes inf in float32


def check_values(
    values: Any, name: str, *, low: float | None = None, low_open: bool = False, hint: str = ""
) -> np.ndarray | None:
    """Raise if a concrete array ``values`` has a non-finite entry, or one below ``low`` (at ``low`` too
    with ``low_open``). Returns the values as NumPy, or None for a traced array (unknown at trace time)."""
    try:
        arr = np.asarray(values)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    if not np.issubdtype(arr.dtype, np.number):
        return arr  # the caller's dtype check reports it
    bad = ~np.isfinite(arr)
    need = "finite"
    if low is not None:
        bad |= arr <= low if low_open else arr < low
        need += f" and {'>' if low_open else '>='} {low:g}"
    if np.any(bad):
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"`{name}` must be {need} everywhere; entry {first} is {arr[first].item()!r}.{hint}")
    return arr


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{leaf path: shape}`` of a pytree (paths as ``jax.tree_util.keystr`` writes them)."""
    return {
        jax.tree_util.keystr(path): tuple(jnp.shape(x)) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def check_variables(variables: Any, expected: dict[str, dict[str, tuple[int, ...]]], owner: str) -> None:
    """Raise unless ``variables`` is a mapping whose collections have the leaf paths and shapes of
    ``expected`` (``{collection: tree_shapes(...)}``; an empty collection may be left out)."""
    if not hasattr(variables, "keys") or not hasattr(variables, "__getitem__"):
        raise TypeError(f"{owner}: `variables` must be a dict like {sorted(expected)}; got {type(variables).__name__}.")
    for name, want in expected.items():
        if name not in variables:
            if not want:
                continue
            raise ValueError(
                f"{owner}: `variables` has collections {sorted(variables)} but the model needs {sorted(expected)}; "
                f"'{name}' is missing."
            )
        got = tree_shapes(variables[name])
        if got == want:
            continue
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
        detail = "; ".join(
            part
            for part in (
                f"missing leaves {missing[:5]}" if missing else "",
                f"unexpected leaves {extra[:5]}" if extra else "",
                ", ".join(f"{k} has shape {g}, expected {w}" for k, g, w in wrong[:5]),
            )
            if part
        )
        raise ValueError(
            f"{owner}: `variables['{name}']` does not fit this model ({detail}). Pass variables of this model "
            "(e.g. its Functional's `variables`, updated), not another one's."
        )
