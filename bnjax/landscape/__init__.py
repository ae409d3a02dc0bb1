"""Landscape analysis of batch normalization (Santurkar et al. 2018; Li et al. 2018).

Every measure is a pure, jittable function of a loss ``loss_fn(params, batch, *args) -> scalar`` (the
convention of :mod:`bnjax.curvature`; for Flax models with ``batch_stats`` build it with
:func:`bnjax.curvature.operators.flax_curvature_fns` and pass ``batch_stats`` as the extra argument), the
parameters, a batch and options. Bind ``loss_fn`` and the options once and ``jax.jit`` the result to reuse
one compilation along training.

- :func:`smoothness`: loss landscape variation, gradient predictiveness, effective beta-smoothness along
  ``-grad L`` over a grid of step sizes (:func:`step_size_grid`), all step sizes in one vectorized call.
- :func:`internal_covariate_shift`: per layer ``||G - G'||`` and ``cos(G, G')``, ``G'`` after the earlier
  layers took the step's update; the layer order is an argument (:func:`module_call_order` finds it).
- :func:`activation_statistics` / :func:`capture_inputs`: per-layer input means, stds and histograms,
  recorded by layer taps (:mod:`bnjax.taps`) from the unmodified model.
- :func:`interpolation`, :func:`slice_1d`, :func:`slice_2d`: loss slices; :func:`random_direction` and
  :func:`filter_normalize` give Li et al.'s filter-normalized directions.

The per-layer helpers take a Flax linen ``apply`` and its variables, or for a Flax NNX module or an Equinox
``(model, state)`` the ``apply`` and ``variables`` of :func:`bnjax.as_functional`: one code path serves the
three frameworks.
"""

from bnjax.landscape.activations import (
    ActivationStats,
    activation_statistics,
    capture_inputs,
    histogram_edges,
    input_statistics,
    module_call_order,
)
from bnjax.landscape.covariate_shift import CovariateShiftResult, internal_covariate_shift, layer_groups
from bnjax.landscape.slices import filter_normalize, interpolation, random_direction, slice_1d, slice_2d
from bnjax.landscape.smoothness import SmoothnessResult, smoothness, step_size_grid

__all__ = [
    "ActivationStats",
    "CovariateShiftResult",
    "SmoothnessResult",
    "activation_statistics",
    "capture_inputs",
    "filter_normalize",
    "histogram_edges",
    "input_statistics",
    "internal_covariate_shift",
    "interpolation",
    "layer_groups",
    "module_call_order",
    "random_direction",
    "slice_1d",
    "slice_2d",
    "smoothness",
    "step_size_grid",
]
