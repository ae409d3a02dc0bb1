"""Curvature toolkit: Hessian/GGN-vector products, chunked data-set operators, eigen-solvers, trace and
spectral density, an edge-of-stability tracker, and mini-batch curvature for SGD (batch sharpness).

All solvers take a *matvec* ``matvec(vector, *params) -> vector`` on pytree vectors (matfree's convention:
parameters explicit, not closed over); build one with :func:`hessian_matvec`, :func:`ggn_matvec`,
:func:`dataset_hessian_matvec` or :func:`dataset_ggn_matvec`. Every solver and the tracker take
``placement`` (where the loop runs, :mod:`bnjax.loops`) and ``linearize_budget`` (linearize the operator once
per parameter point when its residuals fit; :func:`linearization_bytes`). The data-set operators and the
tracker take ``shards`` for data sharded over devices (data-parallel chunks; :func:`chunked_mean`,
:func:`data_shards`).
"""

from bnjax.curvature.batch_sharpness import BatchLambdaMax, BatchSharpness, batch_lambda_max, batch_sharpness
from bnjax.curvature.density import SpectralDensity, TraceEstimate, hutchinson_trace, slq_density
from bnjax.curvature.eigen import (
    DEFAULT_LINEARIZE_BUDGET,
    EigenResult,
    LanczosDecomposition,
    lanczos,
    lanczos_decomposition,
    lanczos_top,
    linearization_bytes,
    power_iteration,
    power_iteration_topk,
    random_like,
    smallest_eigenvalue,
)
from bnjax.curvature.eos import (
    EoSTracker,
    StabilityRule,
    TrackerState,
    adam_preconditioner,
    adam_rule,
    gd_rule,
    heavy_ball_rule,
    load_records,
    plot_records,
    preconditioned_matvec,
    records_to_arrays,
    save_records,
)
from bnjax.curvature.hvp import Matvec, ggn_matvec, gnvp, hessian_matvec, hvp
from bnjax.curvature.operators import (
    FlaxCurvatureFns,
    chunked_mean,
    data_shards,
    dataset_ggn_matvec,
    dataset_gnvp,
    dataset_hessian_matvec,
    dataset_hvp,
    dataset_loss,
    dataset_value_and_grad,
    flax_curvature_fns,
)

__all__ = [
    "BatchLambdaMax",
    "BatchSharpness",
    "batch_lambda_max",
    "batch_sharpness",
    "DEFAULT_LINEARIZE_BUDGET",
    "EigenResult",
    "EoSTracker",
    "StabilityRule",
    "TrackerState",
    "adam_preconditioner",
    "adam_rule",
    "gd_rule",
    "heavy_ball_rule",
    "load_records",
    "plot_records",
    "preconditioned_matvec",
    "records_to_arrays",
    "save_records",
    "FlaxCurvatureFns",
    "LanczosDecomposition",
    "Matvec",
    "SpectralDensity",
    "TraceEstimate",
    "chunked_mean",
    "data_shards",
    "dataset_ggn_matvec",
    "dataset_gnvp",
    "dataset_hessian_matvec",
    "dataset_hvp",
    "dataset_loss",
    "dataset_value_and_grad",
    "flax_curvature_fns",
    "ggn_matvec",
    "gnvp",
    "hessian_matvec",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "lanczos_decomposition",
    "lanczos_top",
    "linearization_bytes",
    "power_iteration",
    "power_iteration_topk",
    "random_like",
    "slq_density",
    "smallest_eigenvalue",
]
