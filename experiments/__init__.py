"""Experiments that test the batchnorm literature's claims with bnjax; run ``python -m experiments --help``.

Each experiment is a module with a frozen ``Config`` dataclass (defaults = the full run), ``PRESETS`` (``quick``:
minutes on a CPU; ``smoke``: seconds, for tests) and ``run(config, out) -> report.Outcome``. The command line
(:mod:`experiments.cli`) writes ``config.json``, ``results.json`` and ``report.md`` next to the plots.
"""

# name -> (module, one-line summary); modules are imported only when their experiment runs.
EXPERIMENTS = {
    "eos": ("experiments.eos", "edge of stability (flagship): sharpness of GD/momentum/Adam vs 2/eta, BN vs no BN"),
    "eoss": (
        "experiments.eoss",
        "edge of stochastic stability: SGD batch sharpness vs 2/eta over batch sizes, BN vs none",
    ),
    "smoothness": ("experiments.smoothness", "STIM18 smoothness: loss variation, gradient predictiveness, beta"),
    "covariate_shift": ("experiments.covariate_shift", "STIM18 covariate shift: activation drift, ICS, noisy BN"),
    "robustness": ("experiments.robustness", "final loss/accuracy over learning rates x init scales, BN vs none"),
    "batch_size": ("experiments.batch_size", "LWSP18: generalization gap vs batch size, BN vs none vs ghost BN"),
    "conditioning": ("experiments.conditioning", "Hessian spectrum and condition number of a linear model, BN vs none"),
    "inference_stats": ("experiments.inference_stats", "eval accuracy vs BN momentum, and with precise statistics"),
    "claims": ("experiments.claims", "the claims matrix: every experiment's claims on each architecture family"),
}
