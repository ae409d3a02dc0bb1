"""PyTorch BatchNorm state <-> bnjax variables, with the conventions handled (no torch dependency).

A PyTorch ``nn.BatchNorm{1,2,3}d`` state dict holds ``weight`` and ``bias`` (the affine parameters, absent
when ``affine=False``), ``running_mean``, ``running_var`` and ``num_batches_tracked``. PyTorch's formulas:

- eval: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``;
- train: ``y`` uses the batch mean and the *biased* batch variance, then ``num_batches_tracked += 1`` and
  ``running = (1 - f) * running + f * batch`` with ``f = momentum``, or ``f = 1 / num_batches_tracked``
  (after the increment; a cumulative average) when ``momentum=None``; the variance fed to the running
  average is the *unbiased* one, ``n / (n - 1)`` times the biased, ``n`` = elements per channel.

``bnjax.BatchNorm(convention="torch", momentum=m, epsilon=eps)`` implements exactly these formulas, with
``momentum`` meaning what it means in PyTorch and ``num_batches_tracked`` kept in ``batch_stats``; load into
it to port a model that will keep training. ``convention="flax"`` gives identical eval outputs, but further
training then uses Flax's rules: momentum ``1 - m`` on the old value (:func:`flax_momentum`; there is no
Flax equivalent of ``momentum=None``) and the biased batch variance, so its running statistics drift from
PyTorch's by the factor ``n / (n - 1)`` in the variance. PyTorch's ``BatchNorm2d`` works on NCHW: use
``axis=1`` (or transpose the input to NHWC and keep ``axis=-1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._validate import FLOAT32_MAX
from bnjax.batchnorm import Convention

_REQUIRED = ("running_mean", "running_var")
_KNOWN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def flax_momentum(torch_momentum: float | None) -> float:
    """The Flax-convention momentum (weight on the old value) of PyTorch's ``momentum`` (weight on the batch).

    Raises:
      ValueError: for ``None`` (PyTorch's cumulative average has no fixed Flax momentum; use
        ``convention="torch"``) or a value outside ``[0, 1]``.
    """
    if torch_momentum is None:
        raise ValueError(
            "torch momentum=None is a cumulative average with no fixed Flax momentum; load the state into "
            'bnjax.BatchNorm(convention="torch", momentum=None) instead.'
        )
    if not 0.0 <= torch_momentum <= 1.0:
        raise ValueError(f"torch momentum must be in [0, 1], got {torch_momentum!r}.")
    return 1.0 - float(torch_momentum)


def from_torch(
    state: Mapping[str, Any], *, convention: Convention = "torch", strict: bool = True
) -> dict[str, dict[str, jax.Array]]:
    """bnjax variables ``{"params": ..., "batch_stats": ...}`` of one BN layer from its PyTorch state.

    Args:
      state: ``weight``, ``bias`` (optional together: ``affine=False``), ``running_mean``, ``running_var``
        (float arrays of shape ``[C]``) and ``num_batches_tracked`` (integer scalar; optional, 0 if absent),
        as NumPy arrays, e.g. ``{k[len("bn1."):]: v.numpy() for k, v in sd.items() if k.startswith("bn1.")}``.
      convention: ``"torch"`` (keeps ``num_batches_tracked`` in ``batch_stats`` as int32) or ``"flax"``
        (drops it); must match the ``convention`` of the ``bnjax.BatchNorm`` the variables are used with.
      strict: as in PyTorch's ``load_state_dict`` (strict by default): keys other than the five above are
        an error, listed together with any missing key. ``strict=False`` ignores unexpected keys (missing
        required keys are always an error).

    Returns:
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"[, "num_batches_tracked"]}}``, float32
      arrays of shape ``[C]`` (``params`` is empty for ``affine=False``: use ``use_scale=use_bias=False``).

    Raises:
      ValueError: missing or (with ``strict``) unexpected keys, all listed in one message; mismatched
        shapes; non-finite values or values beyond float32's range; a negative ``running_var`` (the indices are
        named); a ``num_batches_tracked`` that is not a non-negative integer.
      TypeError: arrays that do not hold real numbers.
    """
    if convention not in ("flax", "torch"):
        raise ValueError(f'convention must be "flax" or "torch", got {convention!r}.')
    missing = [k for k in _REQUIRED if k not in state]
    if ("weight" in state) != ("bias" in state):
        missing.append("bias" if "weight" in state else "weight")
    unexpected = sorted(k for k in state if k not in _KNOWN) if strict else []
    if missing or unexpected:
        raise ValueError(
            f"the PyTorch state does not fit one BatchNorm layer: missing keys {missing}, unexpected keys "
            f"{unexpected} (keys given: {sorted(state)}). Expected running_mean, running_var, optionally "
            "num_batches_tracked, and both weight and bias or neither (affine=False). A layer built with "
            "track_running_stats=False has no running statistics to load; keys with a module prefix "
            "('bn1.weight') must have the prefix stripped; strict=False ignores unexpected keys."
        )
    _check_channels({k: state[k] for k in ("running_mean", "running_var", "weight", "bias") if k in state})
    f32 = lambda a: jnp.asarray(np.asarray(a), jnp.float32)  # noqa: E731
    params = {}
    if "weight" in state:
        params = {"scale": f32(state["weight"]), "bias": f32(state["bias"])}
    stats = {"mean": f32(state["running_mean"]), "var": f32(state["running_var"])}
    if convention == "torch":
        n = _count(state.get("num_batches_tracked", 0))
        if n > np.iinfo(np.int32).max:
            raise ValueError(f"num_batches_tracked={n} does not fit bnjax's int32 counter.")
        stats["num_batches_tracked"] = jnp.asarray(n, jnp.int32)
    return {"params": params, "batch_stats": stats}


def _check_channels(arrays: Mapping[str, Any]) -> None:
    """One BN layer's per-channel arrays (the first is the reference): real numbers of one shape ``[C]``, finite
    and within float32, the variance (``running_var`` or ``var``) non-negative; offending indices named."""
    first, ref = next(iter(arrays.items()))
    shape = np.shape(ref)
    if len(shape) != 1:
        raise ValueError(f"{first} must have shape [C], got {shape}.")
    for key, value in arrays.items():
        if np.shape(value) != shape:
            raise ValueError(f"{key} has shape {np.shape(value)} but {first} has shape {shape}.")
        a = np.asarray(value)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == np.bool_:
            raise TypeError(f"{key} must hold real numbers, got dtype {a.dtype}.")
        a = a.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{key} has non-finite values at indices {bad[:10].tolist()}.")
        big = np.flatnonzero(np.abs(a) > FLOAT32_MAX)
        if big.size:
            raise ValueError(
                f"{key} has values beyond float32's range at indices {big[:10].tolist()} "
                f"(e.g. {float(a[big[0]])!r}); they would become inf."
            )
        if key in ("running_var", "var"):
            negative = np.flatnonzero(a < 0)
            if negative.size:
                raise ValueError(
                    f"{key} is negative at indices {negative[:10].tolist()} (e.g. {float(a[negative[0]])!r}); "
                    "a variance must be >= 0."
                )


def _count(value: Any) -> int:
    """``num_batches_tracked`` as a non-negative Python int (an integer scalar, or a float holding one)."""
    a = np.asarray(value)
    whole = a.shape == () and a.dtype != np.bool_ and (np.issubdtype(a.dtype, np.integer) or (
        np.issubdtype(a.dtype, np.floating) and np.isfinite(a) and float(a) == np.floor(a)))  # fmt: skip
    if not whole or int(a) < 0:
        raise ValueError(f"num_batches_tracked must be a non-negative integer scalar, got {value!r}.")
    return int(a)


def to_torch(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, num_batches_tracked: int | None = None
) -> dict[str, np.ndarray]:
    """PyTorch state of one BN layer (the inverse of :func:`from_torch`), as NumPy arrays.

    Args:
      params: the layer's params (``scale``/``bias``, possibly absent).
      batch_stats: the layer's ``mean``, ``var`` and, for ``convention="torch"``, ``num_batches_tracked``.
      num_batches_tracked: value to export when ``batch_stats`` has none (convention ``"flax"``); default 0.

    Returns:
      ``running_mean``, ``running_var`` (float32), ``num_batches_tracked`` (int64 scalar) and, when
      ``params`` has them, ``weight`` and ``bias`` (a missing ``scale`` exports as ones, a missing ``bias``
      as zeros, since PyTorch's affine layers have both).

    Raises:
      ValueError: missing ``mean``/``var`` or keys other than ``scale``/``bias`` in ``params`` (e.g. a whole
        model's variables), mismatched shapes, non-finite or out-of-float32 values, a negative ``var``, or a
        ``num_batches_tracked`` that is not a non-negative integer.
    """
    missing = [k for k in ("mean", "var") if k not in batch_stats]
    unknown = sorted(set(params) - {"scale", "bias"})
    if missing or unknown:
        raise ValueError(
            f"to_torch takes one BN layer's variables: batch_stats needs 'mean' and 'var' (missing {missing}; "
            f"given {sorted(batch_stats)}) and params holds only 'scale'/'bias' (unexpected {unknown}). Pass "
            "variables['params']['bn1'] and variables['batch_stats']['bn1'], not the whole model's."
        )
    _check_channels({"mean": batch_stats["mean"], "var": batch_stats["var"], **params})
    mean = np.asarray(batch_stats["mean"], np.float32)
    out = {"running_mean": mean, "running_var": np.asarray(batch_stats["var"], np.float32)}
    n = batch_stats.get("num_batches_tracked", num_batches_tracked)
    out["num_batches_tracked"] = np.asarray(0 if n is None else _count(n), np.int64)
    if "scale" in params or "bias" in params:
        out["weight"] = np.asarray(params.get("scale", np.ones_like(mean)), np.float32)
        out["bias"] = np.asarray(params.get("bias", np.zeros_like(mean)), np.float32)
    return out
