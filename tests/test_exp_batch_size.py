"""Tests of experiments/batch_size.py: seeds give intervals, diverged seeds are reported, the verdicts follow
the interval rule on constructed inputs, and CHOICES / MATRIX name valid Config overrides."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import batch_size, cli, models

SIZES = (16, 64, 256)


def _runs(gap_slope: float, noise: float, seeds: int = 3, ghost_gain: float = 0.02) -> list[dict]:
    """Constructed runs: BN's gap grows by ``gap_slope`` per doubling, with per-seed noise ``noise``."""
    rng = np.random.default_rng(0)
    runs = []
    for k, b in enumerate(SIZES):
        t = np.log2(b)
        for variant in batch_size.VARIANTS:
            if variant == "ghost" and b <= 32:
                continue
            test = np.full(seeds, 0.8) + noise * rng.standard_normal(seeds)
            if variant == "bn":
                test = test - gap_slope * t + (0.05 if k == 1 else 0.0)
            if variant == "ghost":
                test = test - gap_slope * t + ghost_gain
            train = np.full(seeds, 0.95)
            runs.append(
                {
                    "batch_size": b,
                    "variant": variant,
                    "test_accuracy": test,
                    "train_accuracy": train,
                    "gap": train - test,
                    "diverged_at": [-1] * seeds,
                }
            )
    return runs


def _verdicts(runs):
    claims, effects = batch_size._claims(batch_size.Config(batch_sizes=SIZES), runs)
    return [c.verdict for c in claims], claims, effects


def test_verdicts_follow_the_interval_rule():
    held, claims, effects = _verdicts(_runs(gap_slope=0.02, noise=0.001))
    assert held == ["held", "held", "held", "held"]
    assert all(c.effect and "[" in c.effect for c in claims)
    assert effects["gap_slope"]["n"] == 3 and effects["gap_slope"]["low"] > 0
    # The opposite trend (gap narrows) is not held; ghost worse than BN is not held.
    reverse, _, _ = _verdicts(_runs(gap_slope=-0.02, noise=0.001, ghost_gain=-0.02))
    assert reverse[0] == "not held" and reverse[1] == "not held" and reverse[3] == "not held"
    # Seed noise far above the effect: the intervals contain 0.
    noisy, _, _ = _verdicts(_runs(gap_slope=0.001, noise=0.2))
    assert noisy[0] == "inconclusive" and noisy[1] == "inconclusive"


def test_one_seed_is_inconclusive():
    verdicts, _, _ = _verdicts(_runs(gap_slope=0.02, noise=0.001, seeds=1))
    assert set(verdicts) == {"inconclusive"}


def test_diverged_seed_drops_out_and_is_counted():
    runs = _runs(gap_slope=0.02, noise=0.001, seeds=4)
    bn = next(r for r in runs if r["variant"] == "bn" and r["batch_size"] == 256)
    bn["test_accuracy"][0] = np.nan
    bn["gap"][0] = np.nan
    _, _, effects = _verdicts(runs)
    assert effects["gap_slope"]["n"] == 3
    assert batch_size.percent_cell(np.full(3, np.nan)) == "diverged"
    assert batch_size.percent_cell(np.array([0.9, 0.92, np.nan])).startswith("91.0% [")


def test_diverging_run_is_reported(tmp_path):
    config = dataclasses.replace(batch_size.PRESETS["smoke"], lr=1e4, batch_sizes=(32, 64))
    outcome = batch_size.run(config, tmp_path)
    runs = outcome.results["runs"]
    assert any(max(r["diverged_at"]) >= 0 for r in runs if r["variant"] != "none")
    table = outcome.tables[0]
    assert "diverged" in table and "of 3" in table


def test_smoke_gives_intervals_over_seeds(tmp_path):
    out = tmp_path / "bs"
    assert cli.main(["batch_size", "--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"runs", "effects"} <= set(results)
    assert all(len(r["test_accuracy"]) == 3 for r in results["runs"])
    assert results["effects"]["ghost_vs_bn"]["n"] == 3
    report_md = (out / "report.md").read_text()
    assert "## Setting" in report_md and "Verdict rule:" in report_md


def test_choices_and_matrix_are_valid():
    fields = {f.name for f in dataclasses.fields(batch_size.Config)}
    assert set(batch_size.CHOICES) <= fields
    assert set(batch_size.MATRIX) == set(models.FAMILIES)
    assert batch_size.MATRIX["vgg"]["quick"]["dataset"] == "digits"
    for family, forms in batch_size.MATRIX.items():
        assert set(forms) == {"quick", "full"}
        for overrides in forms.values():
            assert set(overrides) <= fields
            config = dataclasses.replace(batch_size.Config(), **overrides)
            assert config.model == family and len(config.seeds) >= 3
            n = 1497 if config.dataset == "digits" else 4000
            batch_size.check(config, n)


@pytest.mark.parametrize("bad", [{"batch_sizes": (64, 16)}, {"ghost_size": 24}, {"lr_scaling": "sqrt"}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        batch_size.check(dataclasses.replace(batch_size.Config(), **bad), 4000)
