"""Tests of experiments.covariate_shift: seeds vmapped into per-seed values and intervals, diverged seeds and
runs reported, the interval verdict on constructed inputs, MATRIX and CHOICES valid."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from experiments import covariate_shift as cs
from experiments import data as data_lib

_MEASURES = ("mean_input_drift", "final_train_loss", "mean_ics_relative_distance", "mean_ics_cosine")


def _runs(**values) -> dict:
    """Constructed ``{norm: run}``: every measure 1.0 per seed unless ``values[norm]`` sets some."""
    runs = {}
    for norm in ("none", "bn", "noisy"):
        run = {m: np.ones(3) for m in _MEASURES}
        run.update({k: np.asarray(v, float) for k, v in values.get(norm, {}).items()})
        runs[norm] = run
    return runs


def _verdicts(runs) -> dict:
    claims, _ = cs.claim_verdicts(runs)
    return {c.claim.split(":")[1].split("(")[0].strip(): c for c in claims}


def test_claims_follow_the_interval_rule_on_constructed_inputs():
    runs = _runs(
        noisy={"mean_input_drift": [3.0, 3.3, 2.9], "final_train_loss": [0.5, 0.55, 0.52]},
        bn={"mean_ics_relative_distance": [0.5, 0.52, 0.49]},  # BN halves ICS: the claim is not held
    )
    v = _verdicts(runs)
    assert v["noisy BN destroys the distributional stability of layer inputs"].verdict == "held"
    assert v["noisy BN still trains faster than no BN"].verdict == "held"
    ics = v["BN does not reduce internal covariate shift in the gradient sense"]
    assert ics.verdict == "not held"
    assert ics.effect.startswith("0.5")


def test_an_interval_containing_the_threshold_is_inconclusive():
    runs = _runs(noisy={"final_train_loss": [0.5, 1.5, 0.9]}, bn={"mean_ics_relative_distance": [0.85, 0.95, 0.9]})
    v = _verdicts(runs)
    assert v["noisy BN still trains faster than no BN"].verdict == "inconclusive"
    # the ICS claim is judged against 0.9x, not 1x
    assert v["BN does not reduce internal covariate shift in the gradient sense"].verdict == "inconclusive"


def test_claims_with_a_run_diverged_at_every_seed():
    runs = _runs()
    runs["none"] = {"norm": "none", "diverged": "every seed diverged", "diverged_at": [0, 0, 0]}
    v = _verdicts(runs)
    assert v["noisy BN still trains faster than no BN"].verdict == "held"  # it trained; none did not
    assert v["BN does not reduce internal covariate shift in the gradient sense"].verdict == "inconclusive"
    runs = _runs()
    runs["noisy"] = {"norm": "noisy", "diverged": "every seed diverged", "diverged_at": [0, 0, 0]}
    assert {c.verdict for c in cs.claim_verdicts(runs)[0][:2]} == {"inconclusive"}


def test_one_finished_seed_is_inconclusive():
    runs = _runs(noisy={"final_train_loss": [0.5, np.nan, np.nan]})
    assert _verdicts(runs)["noisy BN still trains faster than no BN"].verdict == "inconclusive"


_CONFIG = dataclasses.replace(
    cs.PRESETS["smoke"], seeds=(0, 1, 2), norms=("none", "bn", "noisy"), steps=10, measure_every=5, bins=8
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("covariate_shift")
    return cs.run(_CONFIG, out), out


def test_seeds_give_per_seed_values_and_intervals(tiny):
    outcome, _ = tiny
    for norm, run in outcome.results["runs"].items():
        for measure in _MEASURES:
            assert run[measure].shape == (3,), (norm, measure)
            assert np.all(np.isfinite(run[measure]))
        assert run["diverged_at"] == [-1, -1, -1]
        assert run["losses"].shape == (3, _CONFIG.steps)
        assert len(set(run["final_train_loss"].tolist())) == 3  # three different runs, not one copied
    assert set(outcome.results["effects"]) == {"mean_input_drift", "final_train_loss", "mean_ics_relative_distance"}
    assert "[" in outcome.tables[0] and "0 of 3" in outcome.tables[0]
    assert all(c.effect and c.effect != "–" for c in outcome.claims)
    assert outcome.setting and outcome.reading and outcome.rule == cs.CLAIM_RULE


def test_a_diverged_seed_is_reported_and_left_out(tiny):
    outcome, out = tiny
    runs = copy.deepcopy(outcome.results["runs"])
    noisy = runs["noisy"]
    noisy["diverged_at"] = [5, -1, -1]
    for measure in _MEASURES:
        noisy[measure][0] = np.nan
    noisy["losses"][0, 5:] = np.nan
    runs["bn"] = {"norm": "bn", "diverged": "every seed diverged", "diverged_at": [0, 0, 0]}
    ds = data_lib.load(_CONFIG.dataset, _CONFIG.data_seed)
    again = cs._outcome(_CONFIG, ds, runs, out)
    rows = {line.split("|")[1].strip(): line for line in again.tables[0].splitlines()[2:]}
    assert rows["noisy"].rstrip(" |").endswith("1 of 3")
    assert "diverged" in rows["bn"] and rows["bn"].rstrip(" |").endswith("all")
    speed = next(c for c in again.claims if "trains faster" in c.claim)
    assert "2 seeds" in speed.measured


def test_smoke_preset_is_small():
    smoke = cs.PRESETS["smoke"]
    assert len(smoke.seeds) >= 2 and smoke.steps <= 40


@pytest.mark.parametrize("family", sorted(cs.MATRIX))
@pytest.mark.parametrize("form", ["quick", "full"])
def test_matrix_entries_build_valid_configs(family, form):
    overrides = cs.MATRIX[family][form]
    assert set(overrides) <= {f.name for f in dataclasses.fields(cs.Config)}
    config = dataclasses.replace(cs.Config(), **overrides)
    cs.check(config)
    assert len(config.seeds) >= 3 and config.model == family
    if family == "vgg":
        assert config.dataset == "digits"


def test_choices_and_defaults():
    assert set(cs.CHOICES) <= {f.name for f in dataclasses.fields(cs.Config)}
    assert cs.Config().model == "cnn1d" and len(cs.Config().seeds) >= 3
    for model in cs.CHOICES["model"]:
        cs.check(dataclasses.replace(cs.Config(), model=model))
    with pytest.raises(ValueError, match="norms must include a pair"):
        cs.check(dataclasses.replace(cs.Config(), norms=("noisy",)))
