"""Tests of experiments.robustness: seeds batched with the grid, the interval verdict on constructed inputs,
diverged runs reported, MATRIX and CHOICES valid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments import robustness as rob


def _results(good_bn: list[int], good_none: list[int], n_grid: int = 4, div_none=None) -> dict:
    """Constructed ``{norm: run}`` with [grid, seeds] fields: ``good_*[s]`` grid points at accuracy 0.9 (the
    rest at 0.1) for seed s; ``div_none[s]`` of none's remaining points diverged."""
    seeds = len(good_bn)
    out = {}
    for norm, good in (("none", good_none), ("bn", good_bn)):
        acc = np.full((n_grid, seeds), 0.1)
        diverged = np.zeros((n_grid, seeds), bool)
        for s, k in enumerate(good):
            acc[:k, s] = 0.9
            if norm == "none" and div_none is not None:
                diverged[n_grid - div_none[s] :, s] = True
        acc = np.where(diverged, np.nan, acc)
        out[norm] = {
            "test_accuracy": acc,
            "final_train_loss": np.where(diverged, np.nan, 1.0),
            "test_loss": np.where(diverged, np.nan, 1.0),
            "diverged": diverged,
            "diverged_at": np.where(diverged, 3, -1),
        }
    return out


@pytest.mark.parametrize(
    "good_bn, good_none, verdict",
    [
        ([3, 4, 4], [1, 1, 2], "held"),  # BN trains well at more points at every seed
        ([1, 1, 0], [3, 4, 3], "not held"),
        ([3, 1, 2], [1, 3, 2], "inconclusive"),  # the interval contains 0
        ([2, 2, 2], [1, 1, 1], "held"),  # the same difference at every seed: zero-width interval above 0
        ([2, 2, 2], [2, 2, 2], "inconclusive"),
        ([4], [0], "inconclusive"),  # one seed: no interval
    ],
)
def test_good_claim_follows_the_interval_rule(good_bn, good_none, verdict):
    claims, effects = rob.claim_verdicts(_results(good_bn, good_none), 0.9, 4)
    assert claims[0].verdict == verdict
    diff = np.subtract(good_bn, good_none)
    assert effects["good_difference"]["mean"] == pytest.approx(diff.mean())
    assert effects["good_difference"]["n"] == len(good_bn)
    assert claims[0].effect and claims[0].effect != "–"


def test_diverged_claim_counts_per_seed_divergence():
    claims, effects = rob.claim_verdicts(_results([2, 2, 2], [1, 1, 1], div_none=[2, 3, 2]), 0.9, 4)
    assert claims[1].verdict == "held"
    assert effects["diverged_counts"]["none"].tolist() == [2, 3, 2]
    assert effects["diverged_counts"]["bn"].tolist() == [0, 0, 0]
    assert "per seed none vs BN: 2 vs 0, 3 vs 0, 2 vs 0" in claims[1].measured


def test_good_points_are_relative_to_each_seeds_best():
    results = _results([1, 1], [0, 0], n_grid=2)
    results["bn"]["test_accuracy"][0, 1] = 0.5  # seed 1's best is 0.5; 0.1 is below 0.9 of it
    good, best = rob.good_points(results, 0.9)
    assert best.tolist() == [0.9, 0.5]
    assert good["bn"][:, 1].tolist() == [True, False]
    assert not good["none"].any()


def test_summarize_marks_the_first_non_finite_step():
    losses = np.ones((2, 3, 10))
    losses[1, 0, 4:] = np.nan
    losses[1, 2, 7] = np.inf
    out = rob.summarize(losses, np.ones((2, 3)), np.full((2, 3), 0.5))
    assert out["diverged_at"].tolist() == [[-1, -1, -1], [4, -1, 7]]
    assert np.isnan(out["test_accuracy"][1, 0]) and out["test_accuracy"][1, 1] == 0.5
    assert rob._cell(out["test_accuracy"][1], out["diverged"][1]).endswith("diverged 2 of 3")


def _tiny(**overrides) -> rob.Config:
    base = dict(hidden=(8,), lrs=(0.1, 1e4), init_scales=(1.0,), batch_size=32, steps=10, segment=5)
    return dataclasses.replace(rob.PRESETS["smoke"], **{**base, **overrides})


def test_a_run_gives_per_seed_values_and_reports_diverged_runs(tmp_path):
    config = _tiny(loss="square")
    outcome = rob.run(config, tmp_path)
    none = outcome.results["none"]
    assert none["test_accuracy"].shape == (2, 3)  # [grid, seeds]
    assert np.all(np.isfinite(none["test_accuracy"][0]))
    assert len(set(none["test_accuracy"][0].tolist())) > 1  # the seeds are different runs
    assert none["diverged"][1].all() and (none["diverged_at"][1] >= 0).all()  # lr 1e4 diverges
    assert "diverged (3 of 3)" in outcome.tables[0]
    for claim in outcome.claims:
        assert claim.verdict in ("held", "not held", "inconclusive") and claim.effect
    assert outcome.setting and outcome.reading and outcome.rule == rob.CLAIM_RULE


def test_smoke_preset_has_seeds():
    assert len(rob.PRESETS["smoke"].seeds) >= 2


@pytest.mark.parametrize("family", sorted(rob.MATRIX))
@pytest.mark.parametrize("form", ["quick", "full"])
def test_matrix_entries_build_valid_configs(family, form):
    overrides = rob.MATRIX[family][form]
    fields = {f.name for f in dataclasses.fields(rob.Config)}
    assert set(overrides) <= fields
    config = dataclasses.replace(rob.Config(), **overrides)
    rob.check(config)
    assert len(config.seeds) >= 3
    assert config.model == family
    if family == "vgg":
        assert config.dataset == "digits"


def test_choices_are_config_fields_and_accepted():
    fields = {f.name for f in dataclasses.fields(rob.Config)}
    assert set(rob.CHOICES) <= fields
    assert "deep_linear" in rob.CHOICES["model"]
    for model in rob.CHOICES["model"]:
        rob.check(dataclasses.replace(rob.Config(), model=model))
    with pytest.raises(ValueError, match="model must be one of"):
        rob.check(dataclasses.replace(rob.Config(), model="resnet"))
