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
    # quick: 109 s alone (one seed; README's main job); full: 830 s, 3 seeds x 14 settings, the eos/mlp entry of
    # the full claims matrix (experiments/results/claims-full/eos-mlp).
    "eos": {"quick": "1.8 min", "full": "13.8 min", "measured": "2026-12-04, 2 CPU cores, load ~1.5"},
    # full: 396 s, the eoss/mlp entry of the full claims matrix (same config as the default); quick: 97 s alone.
    "eoss": {"quick": "1.6 min", "full": "6.6 min", "measured": "2026-12-04, 2 CPU cores, load ~1.5"},
    # smoothness, inference_stats: the presets are the cnn1d entries of the claims matrices (39 s / 129 s and
    # 45 s / 161 s); conditioning: the linear entries (same config as the presets).
    "smoothness": {"quick": "0.7 min", "full": "2.2 min", "measured": "2026-12-04, 2 CPU cores, load ~1.5"},
    "inference_stats": {"quick": "0.8 min", "full": "2.7 min", "measured": "2026-12-04, 2 CPU cores, load ~1.5"},
    "conditioning": {"quick": "0.1 min", "full": "0.2 min", "measured": "2026-12-04, 2 CPU cores, load ~1.5"},
    # covariate_shift, robustness, batch_size: quick presets timed alone (58 s, 120 s, 62 s); full defaults timed
    # alone on quiet cores: covariate_shift and batch_size on 2026-12-05 (127 s, 254 s), robustness on 2026-12-06
    # (850 s, 7 x 3 grid x 3 seeds x 2000 steps, both held; on cores ~1.5x slower than 2026-12-04's).
    "covariate_shift": {
        "quick": "1.0 min",
        "full": "2.1 min",
        "measured": "2026-12-05, 2 CPU cores, load ~1.7 (full; quick on 2026-12-04)",
    },
    "robustness": {
        "quick": "2.0 min",
        "full": "14.2 min",
        "measured": "2026-12-06, 2 CPU cores, load ~1.2 (full; quick on 2026-12-04)",
    },
    "batch_size": {
        "quick": "1.0 min",
        "full": "4.2 min",
        "measured": "2026-12-05, 2 CPU cores, load ~1.9 (full; quick on 2026-12-04)",
    },
    # The claims matrix, each form in one invocation on 2026-12-06 (afternoon, nothing else running): quick
    # 666 s, full 2266 s, every cell identical to the earlier runs of 2026-12-04 (sums of entries 13.3 / 53.9
    # min) and of the morning of 2026-12-06 (19.4 / 64.0 min, on cores ~1.7x slower).
    "claims": {"quick": "11.1 min", "full": "37.8 min", "measured": "2026-12-06, 2 CPU cores, load ~1.5-2"},
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
