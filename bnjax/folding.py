"""Fold eval-mode batch norm into the preceding ``nn.Dense`` / ``nn.Conv`` layer.

In eval mode a BN layer after a linear layer is a per-output-feature affine map, so
``BN(W x + b) = (W * k) x + ((b - mean) * k + beta)`` with ``k = gamma / sqrt(var + epsilon)``, scaling the
kernel's output-feature axis. Flax's ``Dense`` kernel is ``[in, out]``, ``Conv``'s ``[*window, in / groups,
out]`` and ``ConvTranspose``'s ``[*window, in, out]``: all scale along the last axis. ``ConvTranspose(...,
transpose_kernel=True)`` stores ``[*window, out, in]``; the variables cannot tell it apart from a plain
``ConvTranspose`` with as many inputs as outputs, so name such layers in ``transposed_kernels``.

The folded model is the same architecture *without* the folded BN layers and with ``use_bias=True`` on
the layers they were folded into (a conv without bias gains one). Flax's automatic names (``Conv_0``,
``Dense_1``, ...) count per module type, so removing the ``BatchNorm_i`` modules leaves the other names
unchanged and the returned variables fit the BN-free model directly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import unfreeze

from bnjax._validate import check_scalar, check_values

Path = str | tuple[str, ...]


def fold_batch_norm(
    variables: Mapping[str, Any],
    pairs: Mapping[Path, Path],
    *,
    epsilon: float | Mapping[Path, float] = 1e-5,
    transposed_kernels: Collection[Path] = (),
) -> dict[str, Any]:
    """Variables of the model with each BN of ``pairs`` folded into its preceding linear layer.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of the model with BN layers (``bnjax.BatchNorm`` or
        ``flax.linen.BatchNorm`` with one feature axis, the last; either momentum convention: eval mode uses
        the stored ``var`` as is in both). Not modified.
      pairs: ``{linear_layer: bn_layer}``, each a module path as a ``"/"``-separated string or a tuple of
        names, e.g. ``{"Conv_0": "BatchNorm_0", "Block_0/Dense_0": "Block_0/BatchNorm_0"}``. The BN must
        act directly on the linear layer's output (nothing in between).
      epsilon: the BN layers' ``epsilon`` (one value, or ``{bn_layer: epsilon}`` for every folded BN).
      transposed_kernels: linear layers (paths as in ``pairs``) whose kernel is ``[..., out, in]``:
        ``nn.ConvTranspose(..., transpose_kernel=True)``. Their second-to-last axis is scaled.

    Returns:
      New variables: the linear layers' ``kernel`` scaled and ``bias`` replaced (created if absent), in
      their original dtypes; the folded BN layers' entries removed from ``params`` and ``batch_stats``
      (collections left empty are dropped). Folding is computed in at least float32.

    Raises:
      ValueError: a path that is missing, a linear layer without a ``kernel``, a BN without ``mean``/``var``,
        a BN whose statistics or parameters (or the linear layer's bias) do not have the kernel's output
        size (naming both layers and both shapes), a negative or non-finite ``var``, or an ``epsilon`` that is
        not a finite number ``> 0``.
    """
    if isinstance(transposed_kernels, str):
        transposed_kernels = (transposed_kernels,)
    transposed = {_split(p) for p in transposed_kernels}
    unknown = transposed - {_split(p) for p in pairs}
    if unknown:
        raise ValueError(
            f"transposed_kernels names {sorted('/'.join(p) for p in unknown)}, which are not linear layers of "
            f"`pairs` ({list(pairs)})."
        )
    for name in ("params", "batch_stats"):
        if name not in variables:
            raise ValueError(f"variables has collections {sorted(variables)}; folding needs {name!r}.")
    params = unfreeze(variables["params"])
    stats = unfreeze(variables["batch_stats"])
    for linear_path, bn_path in pairs.items():
        lin = _get(params, _split(linear_path), "params", "linear layer")
        bn_stats = _get(stats, _split(bn_path), "batch_stats", "BN layer")
        bn_params = _get(params, _split(bn_path), "params", "BN") if _has(params, _split(bn_path)) else {}
        if "kernel" not in lin:
            raise ValueError(f"linear layer {linear_path!r} has params {sorted(lin)}; expected a 'kernel'.")
        if "mean" not in bn_stats or "var" not in bn_stats:
            raise ValueError(f"BN layer {bn_path!r} has batch_stats {sorted(bn_stats)}; expected 'mean' and 'var'.")
        kernel = lin["kernel"]
        out_axis = kernel.ndim - 2 if _split(linear_path) in transposed else kernel.ndim - 1
        out = kernel.shape[out_axis]
        if bn_stats["mean"].shape != (out,):
            raise ValueError(
                f"BN layer {bn_path!r} has statistics of shape {bn_stats['mean'].shape} but linear layer "
                f"{linear_path!r} has {out} output features (kernel shape {kernel.shape}); only a BN "
                "over the last axis of that layer's output can be folded."
            )
        named = [(f"BN layer {bn_path!r} batch_stats", "var", bn_stats["var"])]
        named += [(f"BN layer {bn_path!r} params", k, bn_params[k]) for k in ("scale", "bias") if k in bn_params]
        named += [(f"linear layer {linear_path!r} params", "bias", lin["bias"])] if "bias" in lin else []
        for where, name, value in named:
            if jnp.shape(value) != (out,):
                raise ValueError(
                    f"{where} has {name!r} of shape {jnp.shape(value)}, but linear layer {linear_path!r} has "
                    f"{out} output features (kernel shape {kernel.shape}) and BN layer {bn_path!r} has mean "
                    f"of shape {bn_stats['mean'].shape}; both must be ({out},)."
                )
        check_values(bn_stats["var"], f"BN layer {bn_path!r} batch_stats 'var'", low=0.0)
        eps = _epsilon(epsilon, bn_path)
        acc = jnp.promote_types(kernel.dtype, jnp.float32)
        mul = bn_params.get("scale", jnp.ones(out, acc)).astype(acc) * jnp.reciprocal(
            jnp.sqrt(bn_stats["var"].astype(acc) + eps)
        )
        bias = lin.get("bias", jnp.zeros(out, kernel.dtype))
        new_bias = (bias.astype(acc) - bn_stats["mean"].astype(acc)) * mul
        if "bias" in bn_params:
            new_bias = new_bias + bn_params["bias"].astype(acc)
        # Scale the kernel's output-feature axis; explicit reshape, no implicit rank promotion.
        mul_k = mul.reshape(tuple(out if a == out_axis else 1 for a in range(kernel.ndim)))
        lin["kernel"] = (kernel.astype(acc) * mul_k).astype(kernel.dtype)
        lin["bias"] = new_bias.astype(bias.dtype)
        _delete(params, _split(bn_path))
        _delete(stats, _split(bn_path))
    result = {k: v for k, v in unfreeze(dict(variables)).items() if k not in ("params", "batch_stats")}
    result["params"] = params
    if stats:
        result["batch_stats"] = stats
    return result


def _epsilon(epsilon: float | Mapping[Path, float], bn_path: Path) -> float:
    """The epsilon of BN layer ``bn_path``, validated (> 0, finite)."""
    if isinstance(epsilon, Mapping):
        if bn_path not in epsilon:
            raise ValueError(
                f"epsilon is a mapping without an entry for BN layer {bn_path!r} (it has {list(epsilon)}); "
                "give every folded BN layer's epsilon, or one value for all."
            )
        epsilon = epsilon[bn_path]
    check_scalar(epsilon, f"epsilon (BN layer {bn_path!r})", low=0.0, low_open=True)
    return epsilon


def _split(path: Path) -> tuple[str, ...]:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return False
        tree = tree[name]
    return True


def _get(tree: dict, path: tuple[str, ...], collection: str, what: str) -> dict:
    node = tree
    for i, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            have = sorted(node) if isinstance(node, Mapping) else []
            raise ValueError(
                f"{what} {'/'.join(path)!r}: {collection} has no {'/'.join(path[: i + 1])!r} (available there: {have})."
            )
        node = node[name]
    return node


def _delete(tree: dict, path: tuple[str, ...]) -> None:
    """Remove ``path`` from ``tree`` and any parent left empty."""
    if not _has(tree, path):
        return
    parents = [tree]
    for name in path[:-1]:
        parents.append(parents[-1][name])
    del parents[-1][path[-1]]
    for parent, name in zip(reversed(parents[:-1]), reversed(path[:-1])):
        if parent[name]:
            break
        del parent[name]
