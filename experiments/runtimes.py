"""Measured runtimes of the experiments: the one source for ``--help`` and README.md.

``RUNTIMES[name]`` gives the wall time of ``python -m experiments <name> --quick`` (``"quick"``) and of the
full run (``"full"``) as ``"<n> min"``, and ``"measured"``: when and how (``"YYYY-MM-DD, 2 CPU cores, load
L"``, L the load average of the machine meanwhile), or, for a figure not measured yet, a line starting with
``estimated``. ``python -m experiments <name> --help`` prints :func:`describe`; ``python -m experiments
--help`` lists every experiment's quick and full runtime; tests/test_cli_help.py checks that README.md's
runtime of the main job is ``RUNTIMES["eos"]["quick"]``. Re-measure after changing an experiment, and update
the figures here (and README.md's sentence, which the test then asks for).
"""

from __future__ import annotations

RUNTIMES: dict[str, dict[str, str]] = {
    # quick: 104 s with the GD runs' top-3 tracking (Config docstring); full: 348 s, 14 runs
    # (experiments/results/eos-full, docs/guides/experiments.md).
    "eos": {
        "quick": "1.7 min",
        "full": "5.8 min",
        "measured": "2026-12-04, 2 CPU cores, load ~4 for quick, ~2 for full",
    },
    # quick 195 s, full 753 s (experiments/results/eoss-full), both on that day's code.
    "eoss": {"quick": "3.2 min", "full": "12.6 min", "measured": "2026-12-04, 2 CPU cores, load 7-11"},
    # The figures below are from the code of 2026-11-25 (one seed, MLPs), before the experiments were rebuilt
    # with seeds and conv nets; quick from docs/guides/experiments.md, full from experiments/results/*-full.
    "smoothness": {"quick": "1.9 min", "full": "0.9 min", "measured": "2026-11-25, 2 CPU cores, load ~1.5"},
    "covariate_shift": {"quick": "1.5 min", "full": "0.6 min", "measured": "2026-11-25, 2 CPU cores, load ~1.5"},
    "robustness": {"quick": "2 min", "full": "3.8 min", "measured": "2026-11-25, 2 CPU cores, load ~1.5"},
    "batch_size": {"quick": "1.8 min", "full": "2.8 min", "measured": "2026-11-25, 2 CPU cores, load ~1.5"},
    "conditioning": {"quick": "0.6 min", "full": "0.1 min", "measured": "2026-11-25, 2 CPU cores, load ~1.5"},
    "inference_stats": {"quick": "0.7 min", "full": "0.8 min", "measured": "2026-11-25, 2 CPU cores, load ~1.5"},
    # The claims matrix: the budgets of its entries (per experiment <= 90 s quick, <= 6 min full, 8 experiments).
    "claims": {
        "quick": "12 min",
        "full": "48 min",
        "measured": "estimated from the per-experiment budgets, not measured yet",
    },
}


def describe(name: str) -> str:
    """The one-line runtime of an experiment, as ``--help`` prints it."""
    entry = RUNTIMES.get(name)
    if entry is None:
        return "Runtime: not measured yet."
    how = entry["measured"]
    if how[:1].isdigit():
        how = f"measured {how}"
    return f"Runtime ({how}): quick {entry['quick']}, full {entry['full']}."
