"""Precise BN: recompute running statistics as exact population statistics over a data set.

Wu & Johnson ("Rethinking 'Batch' in BatchNorm", 2021) show that the EWMA running statistics are a noisy,
biased estimate of the population statistics the model is evaluated with: their weights decay
geometrically, so they mostly reflect the last ~``1 / (1 - momentum)`` batches of a model that was still
changing. Precise BN replaces them by equal-weight statistics over many batches of a fixed model.

Scheme (exact, layer by layer). BN layers are visited in the order the model calls them. For layer ``k``
the model runs in eval mode with every *earlier* layer already holding its precise statistics, and the
input of layer ``k`` is recorded by a layer tap (:func:`bnjax.taps.run_tapped`; no change to the model is
needed). The per-batch moments of that input are merged with Chan's count-weighted formula
(:func:`bnjax.statistics.merge_moments`), so the result is the exact mean and variance over all elements
of all batches, whatever the batch sizes (an uneven last batch counts by its size). Layer ``k``'s input depends
only on layers called before it, so each layer's statistics are those of the model whose earlier layers use
precise statistics: the definition. It costs one pass over the batches per BN layer.

Frameworks. The layer taps serve linen models (``flax.linen.intercept_methods``) and NNX and Equinox models
(through :func:`bnjax.as_functional`, whose ``apply`` wraps the layers); only which layers are BN layers and
how their statistics are written depend on the framework (:class:`BNTaps`). The loop above is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import unfreeze
from tqdm.auto import tqdm

from bnjax import loops
from bnjax.batchnorm import batch_moments
from bnjax.module import BatchNorm
from bnjax.statistics import Moments, merge_moments
from bnjax.taps import path_name, run_tapped

ApplyFn = Callable[[Any, Any], Any]
BATCH_NORM_TYPES: tuple[type, ...] = (BatchNorm, nn.BatchNorm)


class BNTaps(Protocol):
    """What :func:`precise_batch_stats` needs of a framework beyond recording layer inputs
    (:func:`bnjax.taps.run_tapped`, which serves every framework).

    ``is_batch_norm(path, layer)``: whether a layer is a BN layer whose statistics can be written (it may
    raise for an unsupported BN type). ``bn_axis(layer)``: the feature axis (or axes) of a BN layer's recorded
    input. ``write_bn_stats(batch_stats, path, acc)``: a new ``batch_stats`` with layer ``path``'s mean and
    variance set from the merged moments ``acc`` (the input is not modified). The ``apply`` of
    :func:`bnjax.as_functional` implements it for NNX and Equinox; linen models get :class:`_LinenBN`.
    """

    def is_batch_norm(self, path: tuple, layer: Any) -> bool: ...

    def bn_axis(self, layer: Any) -> Any: ...

    def write_bn_stats(self, batch_stats: Any, path: tuple, acc: Moments) -> Any: ...


class _LinenBN:
    """:class:`BNTaps` of a linen model: ``bnjax.BatchNorm`` and ``flax.linen.BatchNorm`` layers."""

    def is_batch_norm(self, path, layer):
        return isinstance(layer, BATCH_NORM_TYPES)

    def bn_axis(self, layer):
        return layer.axis

    def write_bn_stats(self, batch_stats, path, acc):
        return write_dict_stats(batch_stats, path, acc)


def add_bn_layer(paths: list, path: tuple) -> None:
    """Append the BN layer ``path`` to ``paths`` (the layers in call order), raising if it is there already: a
    layer called more than once per forward pass has no well-defined population statistics."""
    if path in paths:
        raise ValueError(
            f"The BN layer {path_name(path)} is called more than once per forward pass; precise "
            "statistics need each BN layer to see one input per pass. Use separate BN modules."
        )
    paths.append(path)


def _bn_access(apply_fn: ApplyFn) -> tuple[BNTaps, dict[str, Any]]:
    """The :class:`BNTaps` of ``apply_fn`` and the keyword arguments that run it in eval mode."""
    if hasattr(apply_fn, "write_bn_stats"):  # the apply of bnjax.as_functional
        return cast(BNTaps, apply_fn), {"train": False}
    return _LinenBN(), {}


def batch_norm_layers(apply_fn: ApplyFn, variables: Mapping[str, Any], batch: Any) -> tuple[tuple, ...]:
    """Paths (as in ``variables["batch_stats"]``) of the BN layers, in call order.

    ``apply_fn(variables, batch)`` is traced once (``jax.eval_shape``; nothing is computed). BN layers are
    instances of ``bnjax.BatchNorm`` or ``flax.linen.BatchNorm`` for a linen model; for the ``apply`` of
    :func:`bnjax.as_functional`, ``bnjax.nnx.BatchNorm`` and ``flax.nnx.BatchNorm`` (NNX) or
    ``bnjax.equinox.BatchNorm`` (Equinox).

    Raises:
      ValueError: if a BN layer is called more than once per forward pass (its statistics would mix inputs
        computed before and after its own update, so they are not well defined).
    """
    bn, eval_kwargs = _bn_access(apply_fn)
    paths: list[tuple] = []

    def trace(v, b):
        run = run_tapped(apply_fn, bn.is_batch_norm, v, b, **eval_kwargs)
        _check_eval_mode(run.outputs, run.calls)
        for call in run.calls:
            add_bn_layer(paths, call.path)
        return run.outputs

    jax.eval_shape(trace, variables, batch)
    return tuple(paths)


def _check_eval_mode(outputs: Any, calls: tuple) -> None:
    """Raise if ``apply_fn`` returned mutated collections or a linen BN layer ran in train mode: the recorded
    inputs would then follow batch statistics (and updated running averages), not the model's eval mode."""
    mutated = isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], Mapping)
    if mutated and "batch_stats" in outputs[1]:
        raise ValueError(
            "apply_fn returned updated 'batch_stats' (it requests mutable collections, i.e. runs in train "
            "mode); precise statistics need eval mode, e.g. lambda v, b: model.apply(v, b, train=False)."
        )
    for call in calls:
        flag = call.kwargs.get("use_running_average", getattr(call.layer, "use_running_average", None))
        if flag is False:
            raise ValueError(
                f"BN layer {path_name(call.path)!r} ran with use_running_average=False (train mode); precise "
                "statistics need every BN layer in eval mode, e.g. lambda v, b: model.apply(v, b, train=False)."
            )


def precise_batch_stats(
    apply_fn: ApplyFn,
    variables: Mapping[str, Any],
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact population ("precise BN") running statistics of every BN layer of a Flax model.

    Args:
      apply_fn: ``apply_fn(variables, batch)`` runs the model in *eval* mode (every BN layer with
        ``use_running_average=True``), e.g. ``lambda v, b: model.apply(v, b["x"], train=False)``. Whatever
        it returns is ignored. It must not request mutable collections. For an NNX or Equinox model, pass
        the ``apply`` of :func:`bnjax.as_functional` (it implements :class:`BNTaps`);
        ``batch`` is then what the model is called on.
      variables: the model's variables with ``params`` and ``batch_stats``; not modified.
      batches: the data, iterated once per BN layer: a re-iterable collection (list, tuple) or a
        zero-argument callable returning a fresh iterator each time. A one-shot iterator (generator) is
        rejected because the second layer would see no data.
      num_batches: use only the first ``num_batches`` batches of each pass (None: all of them).
      progress: show a tqdm progress bar over all passes.

    Returns:
      A new ``batch_stats`` of the same structure (for Equinox a new ``eqx.nn.State``): for each BN layer,
      ``mean`` is the population mean and ``var`` the population variance of its input over every reduced
      element of every batch (biased, ``M2 / N``; unbiased, ``M2 / (N - 1)``, for
      ``bnjax.BatchNorm(convention="torch")``, which stores PyTorch's unbiased variance), in the dtype of the
      existing entry. ``num_batches_tracked`` and the statistics of a layer that saw no valid element are left
      unchanged. ``params`` are not touched.

    Raises:
      ValueError: when a layer's input has non-finite statistics (NaN or Inf) in some batch, naming the
        layer and the batch indices (checked once per layer, after its pass; nothing is returned, so no NaN
        statistic can slip into the variables), or when a population variance overflows float32.

    Notes:
      Each pass runs under ``jax.jit`` (one compilation per layer and batch shape) on the default device;
      inputs sharded over devices give global statistics automatically. ``mask=`` arguments given to BN
      layers are honoured. Ghost batches (``virtual_batch_size``) play no role: the population is one set.
    """
    if "batch_stats" not in variables:
        raise ValueError(f"variables has collections {sorted(variables)}, but precise statistics need 'batch_stats'.")
    if isinstance(batches, Mapping):
        raise TypeError(
            f"batches must be a collection of batches (e.g. a list of dicts or arrays), got one mapping "
            f"{type(batches).__name__}; wrap a single batch in a list: [batch]."
        )
    if loops.is_traced(variables):
        raise TypeError(
            "precise_batch_stats runs its own jitted passes and reads their results, so it cannot be called "
            "inside jax.jit; call it eagerly with concrete variables."
        )
    make_iter = _batch_source(batches)
    first = next(iter(make_iter()), None)
    if first is None:
        raise ValueError("batches is empty: precise statistics need at least one batch.")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}.")

    bn, _ = _bn_access(apply_fn)
    layers = batch_norm_layers(apply_fn, variables, first)
    stats = variables["batch_stats"]
    bar_total = None if num_batches is None else num_batches * len(layers)
    if bar_total is None and isinstance(batches, Sized):
        bar_total = len(batches) * len(layers)
    with tqdm(total=bar_total, disable=not progress, desc="precise BN", unit="batch") as bar:
        for path in layers:
            step = jax.jit(_accumulate_step(apply_fn, path))
            acc, finite = None, []
            for i, batch in enumerate(make_iter()):
                if num_batches is not None and i >= num_batches:
                    break
                acc, ok = step(acc, {**variables, "batch_stats": stats}, batch)
                finite.append(ok)  # device scalars: read once per layer, not once per batch
                bar.update(1)
            if acc is None:
                raise ValueError(
                    f"batches yielded no batch for layer {path_name(path)}, though the first pass had one: a "
                    "callable must return a fresh iterator over the same batches on every call."
                )
            _check_finite(path, np.asarray(jnp.stack(finite)), acc)
            stats = bn.write_bn_stats(stats, path, acc)
    return stats


def _check_finite(path: tuple, finite: np.ndarray, acc: Moments) -> None:
    """Raise naming the batches whose statistics at layer ``path`` were non-finite, or an overflow."""
    layer = path_name(path)
    bad = np.flatnonzero(~finite)
    if bad.size:
        raise ValueError(
            f"precise_batch_stats: the input of BN layer {layer!r} has non-finite statistics (NaN or Inf) in "
            f"{bad.size} of {finite.size} batches, the first at index {bad[0]} (indices {bad[:10].tolist()}"
            f"{', ...' if bad.size > 10 else ''}); the precise statistics would be NaN. Remove or repair "
            "those batches (or check the model for an overflow before this layer)."
        )
    have = np.asarray(acc.count > 0)
    ok = np.asarray(jnp.isfinite(acc.offset) & jnp.isfinite(acc.m2))
    if not np.all(ok | ~have):
        raise ValueError(
            f"precise_batch_stats: the statistics of BN layer {layer!r} overflow float32 over the whole data "
            f"set (features {np.flatnonzero(~(ok | ~have)).tolist()}): count x variance exceeds 3.4e38."
        )


def _batch_source(batches) -> Callable[[], Iterable[Any]]:
    if callable(batches):
        return batches
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"batches must be an iterable of batches or a callable returning one, got {type(batches).__name__}."
        ) from None
    if it is batches:
        raise TypeError(
            f"batches is a one-shot iterator ({type(batches).__name__}), but precise statistics iterate over "
            "the data once per BN layer. Pass a list, or a zero-argument function returning a fresh "
            "iterator, e.g. `lambda: make_loader(...)`."
        )
    return lambda: batches


def _accumulate_step(apply_fn: ApplyFn, path: tuple):
    """``(acc, variables, batch) -> acc`` merging the moments of layer ``path``'s input into ``acc``."""
    bn, eval_kwargs = _bn_access(apply_fn)

    def step(acc: Moments | None, variables, batch) -> tuple[Moments, jax.Array]:
        run = run_tapped(apply_fn, lambda p, layer: p == path, variables, batch, **eval_kwargs)
        (call,) = run.calls
        x, mask = call.x, call.kwargs.get("mask")
        if jnp.size(x) == 0:  # an empty batch: no valid element (moments of count 0), as an all-False mask
            x = jnp.zeros(tuple(d or 2 for d in jnp.shape(x)), jnp.result_type(x))
            mask = jnp.zeros(jnp.shape(x), jnp.bool_)
        new = batch_moments(x, axis=bn.bn_axis(call.layer), mask=mask)
        finite = jnp.all((new.count == 0) | (jnp.isfinite(new.offset) & jnp.isfinite(new.m2)))
        if acc is None:
            return new, finite
        # Express the merge around the first batch's shift (keeps the shifted-sum stability across batches).
        shift = jnp.where(acc.count > 0, acc.shift, new.shift)
        stacked = Moments(*(jnp.stack([a, b]) for a, b in zip(acc, new)))
        return merge_moments(stacked, shift, axis=0), finite

    return step


def write_dict_stats(batch_stats: Mapping[str, Any], path: tuple, acc: Moments) -> dict[str, Any]:
    """A copy of a ``batch_stats`` dict (linen, or NNX pure dict) with layer ``path``'s population statistics.

    ``mean`` becomes ``acc``'s mean and ``var`` its biased variance (unbiased where the layer has
    ``num_batches_tracked``, i.e. ``convention="torch"``), in the entries' dtypes; features without a valid
    element keep their values.
    """
    stats = unfreeze(dict(batch_stats))
    layer = stats
    for name in path:
        layer = layer[name]
    mean_old, var_old = layer["mean"], layer["var"]
    unbiased = "num_batches_tracked" in layer  # bnjax.BatchNorm(convention="torch")
    denom = acc.count - 1.0 if unbiased else acc.count
    have = (acc.count > 0).reshape(jnp.shape(mean_old))
    mean = acc.mean.reshape(jnp.shape(mean_old))
    var = (acc.m2 / jnp.maximum(denom, 1.0)).reshape(jnp.shape(var_old))
    layer["mean"] = jnp.where(have, mean, mean_old).astype(jnp.result_type(mean_old))
    layer["var"] = jnp.where(have, var, var_old).astype(jnp.result_type(var_old))
    return stats
