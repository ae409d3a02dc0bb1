"""Float64 NumPy reference formulas for batch normalization (independent of bnjax)."""

from __future__ import annotations

import numpy as np


def reduction_axes(ndim: int, feature_axes) -> tuple[int, ...]:
    feature_axes = tuple(a % ndim for a in np.atleast_1d(feature_axes))
    return tuple(i for i in range(ndim) if i not in feature_axes)


def bn_stats(x, feature_axes=-1, mask=None):
    """Biased mean/var over the non-feature axes (valid elements only), keepdims, float64, and the count."""
    x = np.asarray(x, np.float64)
    axes = reduction_axes(x.ndim, feature_axes)
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(np.float64)
    n = w.sum(axis=axes, keepdims=True)
    mean = (w * x).sum(axis=axes, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(axis=axes, keepdims=True) / n
    return mean, var, n


def bn_forward(x, scale=None, bias=None, feature_axes=-1, eps=1e-5, mask=None):
    """Train-mode batch norm in float64; returns (y, mean, var, count) with statistics flattened."""
    mean, var, n = bn_stats(x, feature_axes, mask)
    y = (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps)
    shape = mean.shape
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y, mean.reshape(-1), var.reshape(-1), n.reshape(-1)


def bn_grad_x(x, dy, scale, feature_axes=-1, eps=1e-5):
    """Background §1: dx = scale/sigma * (dy - mean(dy) - xhat * mean(dy * xhat)), float64."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    mean, var, _ = bn_stats(x, feature_axes)
    axes = reduction_axes(x.ndim, feature_axes)
    sigma = np.sqrt(var + eps)
    xhat = (x - mean) / sigma
    s = np.asarray(scale, np.float64).reshape(mean.shape)
    return s / sigma * (dy - dy.mean(axis=axes, keepdims=True) - xhat * (dy * xhat).mean(axis=axes, keepdims=True))


def torch_running_update(old_mean, old_var, batch_mean, batch_var_biased, n, momentum, num_batches_tracked):
    """PyTorch's documented update: weight `momentum` on the batch (None: cumulative), unbiased variance."""
    factor = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
    unbiased = batch_var_biased * n / (n - 1)
    return (1 - factor) * old_mean + factor * batch_mean, (1 - factor) * old_var + factor * unbiased
