"""Noisy batch normalization: BN followed by non-stationary noise (Santurkar et al. 2018, Algorithm 1).

At every training step, after batch normalization, each unit ``j`` draws a distribution
``mu_j ~ U(-n_mu, n_mu)``, ``sigma_j ~ U(1, n_sigma)``, and each sample ``i`` of that unit draws
``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)`` and ``s_ij ~ N(sigma_j, r_sigma)`` (``r_sigma`` is a *standard
deviation*; the paper does not say), then ``a_ij <- s_ij * a_ij + m_ij``. "Unit" means a feature of the
normalized axis (a channel of a convolution) and "sample" every reduced element: for a convolution each
(example, spatial position, channel) gets its own ``m`` and ``s``. All draws are redrawn from the key at every
call, so the layer input distribution is deliberately non-stationary. No noise in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bnjax._validate import check_key, check_scalar
from bnjax.batchnorm import Axes, BatchNormState, _layout, batch_norm
from bnjax.module import BatchNorm


class NonstationaryNoise(NamedTuple):
    """One draw of STIM18's noise for an activation of shape ``shape`` (feature axes ``axis``).

    Fields:
      scale: float[*shape], ``s_ij ~ N(sigma_j, r_sigma)``.
      shift: float[*shape], ``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)``.
      unit_mean: float[*feature_shape], ``mu_j ~ U(-n_mu, n_mu)``.
      unit_std: float[*feature_shape], ``sigma_j ~ U(1, n_sigma)``.
    """

    scale: jax.Array
    shift: jax.Array
    unit_mean: jax.Array
    unit_std: jax.Array


def _check_magnitudes(n_mu: Any, n_sigma: Any, r_mu: Any, r_sigma: Any) -> None:
    """Validate the magnitudes that are concrete (traced values are taken as given)."""
    checks = [
        ("n_mu", n_mu, 0.0, "U(-n_mu, n_mu) needs n_mu >= 0"),
        ("n_sigma", n_sigma, 1.0, "U(1, n_sigma) needs n_sigma >= 1"),
        ("r_mu", r_mu, 0.0, "U(mu - r_mu, mu + r_mu) needs r_mu >= 0"),
        ("r_sigma", r_sigma, 0.0, "r_sigma is a standard deviation and must be >= 0"),
    ]
    for name, value, low, why in checks:
        check_scalar(value, name, low=low, hint=f" {why}.")


def sample_nonstationary_noise(
    key: jax.Array,
    shape: Sequence[int],
    *,
    axis: Axes = -1,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    dtype: Any = jnp.float32,
) -> NonstationaryNoise:
    """Draw STIM18's non-stationary noise for an activation of shape ``shape``.

    Args:
      key: a PRNG key; the same key gives the same draw.
      shape: the activation's shape, e.g. ``(N, C)`` or ``(N, H, W, C)``.
      axis: feature (unit) axis or axes, as in :func:`bnjax.batch_norm`; every other axis counts as samples.
      n_mu, n_sigma, r_mu, r_sigma: noise magnitudes (paper defaults); ``r_sigma`` is a standard deviation.
      dtype: float dtype of the draws.

    Returns:
      :class:`NonstationaryNoise` with per-element ``scale``/``shift`` of ``shape`` and per-unit
      ``unit_mean``/``unit_std`` of the feature shape.
    """
    _check_magnitudes(n_mu, n_sigma, r_mu, r_sigma)
    check_key(key)
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if dims is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"`shape` must be a sequence of non-negative ints, e.g. (N, C); got {shape!r}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a real float dtype (the noise is continuous); got {np.dtype(dtype)}.")
    shape = tuple(int(d) for d in dims)
    layout = _layout(jax.ShapeDtypeStruct(shape, dtype), axis, None, train=False)
    bshape = [1] * len(shape)
    for a, s in zip(layout.feature_axes, layout.feature_shape):
        bshape[a] = s
    k_mu, k_sigma, k_m, k_s = jax.random.split(key, 4)
    unit_mean = jax.random.uniform(k_mu, layout.feature_shape, dtype, -n_mu, n_mu)
    unit_std = jax.random.uniform(k_sigma, layout.feature_shape, dtype, 1.0, n_sigma)
    mu = unit_mean.reshape(bshape)
    sigma = unit_std.reshape(bshape)
    shift = mu + r_mu * jax.random.uniform(k_m, shape, dtype, -1.0, 1.0)
    scale = sigma + r_sigma * jax.random.normal(k_s, shape, dtype)
    return NonstationaryNoise(scale, shift, unit_mean, unit_std)


def add_nonstationary_noise(
    key: jax.Array,
    y: jax.Array,
    *,
    axis: Axes = -1,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
) -> jax.Array:
    """``s * y + m`` with ``(s, m)`` from :func:`sample_nonstationary_noise` (same arguments).

    Draws in float32 (or ``y``'s dtype if wider) and returns ``y``'s shape and dtype.
    """
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(f"y must be a real floating-point array, got dtype {y.dtype}.")
    acc = jnp.promote_types(y.dtype, jnp.float32)
    noise = sample_nonstationary_noise(
        key, y.shape, axis=axis, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma, dtype=acc
    )
    return (noise.scale * y.astype(acc) + noise.shift).astype(y.dtype)


def noisy_batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    state: BatchNormState | None = None,
    *,
    key: jax.Array | None,
    train: bool,
    axis: Axes = -1,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    **batch_norm_kwargs: Any,
) -> tuple[jax.Array, BatchNormState | None]:
    """:func:`bnjax.batch_norm` followed, in train mode only, by :func:`add_nonstationary_noise`.

    Args:
      x, scale, bias, state, train, axis: as in :func:`bnjax.batch_norm`.
      key: PRNG key for the noise; required when ``train`` (ignored, may be None, in eval mode).
      n_mu, n_sigma, r_mu, r_sigma: noise magnitudes (see module docstring).
      **batch_norm_kwargs: other keyword arguments of :func:`bnjax.batch_norm` (momentum, epsilon, mask, ...).

    Returns:
      ``(y, new_state)`` as :func:`bnjax.batch_norm`; the running statistics are those of the clean batch.
    """
    _check_magnitudes(n_mu, n_sigma, r_mu, r_sigma)
    y, new_state = batch_norm(x, scale, bias, state, train=train, axis=axis, **batch_norm_kwargs)
    if not train:
        return y, new_state
    if key is None:
        raise ValueError(
            "noisy_batch_norm with train=True needs a PRNG `key` for the noise (got None); pass e.g. "
            "jax.random.key(step), or use train=False for the noise-free eval mode."
        )
    check_key(key)
    y = add_nonstationary_noise(key, y, axis=axis, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu, r_sigma=r_sigma)
    return y, new_state


class NoisyBatchNorm(BatchNorm):
    """:class:`bnjax.BatchNorm` followed by STIM18's non-stationary noise in train mode.

    Same fields and the same variables as :class:`bnjax.BatchNorm` (parameters and ``batch_stats`` trees are
    interchangeable), plus the noise magnitudes ``n_mu``, ``n_sigma``, ``r_mu``, ``r_sigma`` (paper defaults;
    ``r_sigma`` is a standard deviation) and ``rng_collection``, the Flax rng stream the noise is drawn from:
    pass ``rngs={"noise": key}`` to ``apply`` in train mode, with a fresh key every training step. The same
    key gives the same noise. In eval mode (``use_running_average=True``) the output equals
    :class:`bnjax.BatchNorm`'s. ``init`` adds no noise and needs no ``"noise"`` rng. The running statistics
    are those of the clean (pre-noise) batch, as BN sees it.
    """

    n_mu: float = 0.5
    n_sigma: float = 1.25
    r_mu: float = 0.1
    r_sigma: float = 0.1
    rng_collection: str = "noise"

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize ``x`` as :class:`bnjax.BatchNorm` does, then add the noise in train mode."""
        _check_magnitudes(self.n_mu, self.n_sigma, self.r_mu, self.r_sigma)
        y = super().__call__(x, use_running_average, mask=mask)
        eval_mode = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if eval_mode or self.is_initializing():
            return y
        return add_nonstationary_noise(
            self.make_rng(self.rng_collection),
            y,
            axis=self.axis,
            n_mu=self.n_mu,
            n_sigma=self.n_sigma,
            r_mu=self.r_mu,
            r_sigma=self.r_sigma,
        )
