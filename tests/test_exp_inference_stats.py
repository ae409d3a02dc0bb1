"""inference_stats: seeds give intervals, the claims follow CLAIM_RULE on constructed per-seed accuracies, the
two momentum conventions are compared on every BN layer, and MATRIX/CHOICES are valid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments import inference_stats as inf


def _run(convention, momentum, ewma, precise, means=None):
    ewma, precise = np.asarray(ewma, float), np.asarray(precise, float)
    return {
        "convention": convention,
        "momentum": momentum,
        "label": inf._label(convention, momentum),
        "test_accuracy_ewma": ewma,
        "test_accuracy_precise": precise,
        "running_means": means if means is not None else [np.zeros(3)] * len(ewma),
    }


def _verdicts(results):
    return {c.claim.split(":")[1].strip()[:40]: c.verdict for c in inf._claims(results)}


def test_the_gap_claim_needs_the_interval_above_zero_at_every_poor_momentum():
    good = _run("flax", 0.9, [0.70, 0.71, 0.69], [0.70, 0.71, 0.69])
    fixed = _run("flax", 0.999, [0.50, 0.55, 0.52], [0.70, 0.71, 0.69])
    noisy = _run("torch", None, [0.60, 0.70, 0.65], [0.70, 0.60, 0.66])  # gains of +0.1, -0.1, +0.01
    claims = inf._claims([good, fixed])
    assert claims[0].verdict == "held" and "+0.177 [" in claims[0].measured
    assert inf._claims([good, fixed, noisy])[0].verdict == "inconclusive"
    worse = _run("torch", None, [0.70, 0.71, 0.69], [0.60, 0.62, 0.61])
    assert inf._claims([good, fixed, worse])[0].verdict == "not held"


def test_at_least_as_good_allows_one_point_and_is_not_held_below_it():
    fixed = _run("flax", 0.999, [0.50, 0.55, 0.52], [0.70, 0.71, 0.69])
    slightly = _run("flax", 0.9, [0.700, 0.710, 0.690], [0.696, 0.706, 0.687])  # -0.004: within one point
    below = _run("flax", 0.99, [0.700, 0.710, 0.690], [0.680, 0.689, 0.671])  # about -0.02
    assert inf._claims([fixed, slightly])[1].verdict == "held"
    claim = inf._claims([fixed, slightly, below])[1]
    assert claim.verdict == "not held" and claim.effect.startswith("lowest: flax 0.99 -0.02")


def test_one_finished_seed_is_inconclusive_and_diverged_seeds_are_left_out():
    fixed = _run("flax", 0.999, [0.50, np.nan, np.nan], [0.70, np.nan, np.nan])
    assert inf._claims([fixed])[0].verdict == "inconclusive"
    assert inf.format_difference(inf.stats.interval([0.2, np.nan])) == "+0.200"


def test_the_conventions_are_compared_on_every_seed_and_layer():
    same = [np.array([0.1, 0.2]), np.array([0.3, 0.4])]
    off = [np.array([0.1, 0.2]), np.array([0.3, 0.41])]
    flax = _run("flax", 0.9, [0.7, 0.7], [0.7, 0.7], same)
    assert inf._claims([flax, _run("torch", 0.1, [0.7, 0.7], [0.7, 0.7], same)])[-1].verdict == "held"
    assert inf._claims([flax, _run("torch", 0.1, [0.7, 0.7], [0.7, 0.7], off)])[-1].verdict == "not held"


def test_running_means_gathers_every_bn_layer_in_order():
    stats = {
        "a": {"BatchNorm_0": {"mean": np.array([1.0]), "var": np.array([9.0])}},
        "b": {"mean": np.array([2.0, 3.0])},
    }
    np.testing.assert_array_equal(inf._running_means(stats), [1.0, 2.0, 3.0])


def test_smoke_run_over_seeds_reports_intervals(tmp_path):
    outcome = inf.run(inf.PRESETS["smoke"], tmp_path)
    (flax, torch) = outcome.results["runs"]
    assert flax["test_accuracy_ewma"].shape == (2,) and flax["diverged_at"] == [-1, -1]
    np.testing.assert_allclose(flax["param_checksum"], torch["param_checksum"], rtol=1e-6)  # same trajectory
    assert outcome.claims[-1].verdict == "held"  # torch 0.1 == flax 0.9 at both seeds
    assert "[" in outcome.tables[0].splitlines()[2]  # a 95% interval over the two seeds
    assert dict(outcome.setting)["seeds"] == "2 (0, 1)" and outcome.rule == inf.CLAIM_RULE


def test_matrix_choices_and_bad_config():
    fields = {f.name for f in dataclasses.fields(inf.Config)}
    assert set(inf.CHOICES) <= fields and set(inf.MATRIX) == {"mlp", "cnn1d", "vgg"}
    for forms in inf.MATRIX.values():
        for overrides in forms.values():
            config = dataclasses.replace(inf.Config(), **overrides)
            assert len(config.seeds) >= 3 and config.model in inf.CHOICES["model"]
    assert inf.MATRIX["vgg"]["quick"]["dataset"] == "digits"
    with pytest.raises(ValueError, match="torch_momenta"):
        inf.run(dataclasses.replace(inf.PRESETS["smoke"], torch_momenta=("fast",)), None)
    with pytest.raises(ValueError, match="seeds must name distinct"):
        inf.run(dataclasses.replace(inf.PRESETS["smoke"], seeds=(1, 1)), None)
