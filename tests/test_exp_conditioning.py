"""Tests of experiments/conditioning.py: intervals over seeds, the verdicts follow the interval rule on
constructed inputs, a singular (infinite condition number) seed is reported, CHOICES / MATRIX are valid."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import cli, conditioning


def _runs(config, cond_ratio: float, excess_ratio: float, noise: float, grow: float = 10.0) -> list[dict]:
    rng = np.random.default_rng(1)
    runs = []
    n = len(config.seeds)
    for offset in config.offsets:
        base = 100.0 * (grow if offset else 1.0) * np.exp(noise * rng.standard_normal(n))
        excess = np.full(n, 0.1) * np.exp(noise * rng.standard_normal(n))
        runs.append({"norm": "none", "offset": offset, "condition_number": base, "final_excess": excess})
        runs.append(
            {
                "norm": "bn",
                "offset": offset,
                "condition_number": base * cond_ratio * np.exp(noise * rng.standard_normal(n)),
                "final_excess": excess * excess_ratio * np.exp(noise * rng.standard_normal(n)),
            }
        )
    return runs


def test_verdicts_follow_the_interval_rule():
    config = conditioning.Config()
    claims, effects = conditioning._claims(config, _runs(config, 0.5, 0.5, 0.01))
    assert [c.verdict for c in claims] == ["held", "held", "held"]
    assert all(c.effect and "x [" in c.effect for c in claims)
    assert effects["condition_number"]["offset=0"]["n"] == 3
    assert effects["condition_number"]["offset=0"]["high"] < 1
    claims, _ = conditioning._claims(config, _runs(config, 2.0, 2.0, 0.01, grow=0.1))
    assert [c.verdict for c in claims] == ["not held", "not held", "not held"]
    claims, _ = conditioning._claims(config, _runs(config, 0.95, 0.95, 0.5))
    assert claims[0].verdict == "inconclusive" and claims[1].verdict == "inconclusive"


def test_offsets_combine_held_only_when_held_everywhere():
    assert conditioning._combine(["held", "held"]) == "held"
    assert conditioning._combine(["held", "inconclusive"]) == "inconclusive"
    assert conditioning._combine(["held", "not held"]) == "not held"
    config = conditioning.Config()
    runs = _runs(config, 0.5, 0.5, 0.01)
    runs[3]["condition_number"] = runs[2]["condition_number"] * 3.0  # BN worse at the second offset
    claims, _ = conditioning._claims(config, runs)
    assert claims[0].verdict == "not held"


def test_one_offset_cannot_judge_growth():
    config = dataclasses.replace(conditioning.Config(), offsets=(0.0,))
    claims, effects = conditioning._claims(config, _runs(config, 0.5, 0.5, 0.01))
    assert claims[2].verdict == "inconclusive" and effects["offset"] is None


def test_singular_seed_is_reported_and_dropped():
    assert conditioning._cell(np.array([1.0, np.inf, 2.0])).startswith("inf")
    assert conditioning._cell(np.array([1.0, 1.2, 1.1])).startswith("1.1 [")
    config = conditioning.Config()
    runs = _runs(config, 0.5, 0.5, 0.01)
    runs[0]["condition_number"][0] = np.inf
    _, effects = conditioning._claims(config, runs)
    assert effects["condition_number"]["offset=0"]["n"] == 2


def test_smoke_gives_intervals_over_seeds(tmp_path):
    out = tmp_path / "cond"
    assert cli.main(["conditioning", "--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"runs", "effects"} <= set(results)
    assert all(len(r["condition_number"]) == 3 for r in results["runs"])
    cond = results["effects"]["condition_number"]
    assert all(cond[k]["n"] == 3 and cond[k]["low"] <= cond[k]["mean"] <= cond[k]["high"] for k in cond)
    # The Lanczos top eigenvalue agrees with the dense one at every seed.
    for r in results["runs"]:
        np.testing.assert_allclose(r["lanczos_lambda_max"], r["lambda_max"], rtol=1e-3)
    report_md = (out / "report.md").read_text()
    assert "## Setting" in report_md and "Verdict rule:" in report_md


def test_choices_and_matrix_are_valid():
    fields = {f.name for f in dataclasses.fields(conditioning.Config)}
    assert set(conditioning.CHOICES) <= fields
    assert set(conditioning.MATRIX) == {"linear"}
    for forms in conditioning.MATRIX.values():
        assert set(forms) == {"quick", "full"}
        for overrides in forms.values():
            assert set(overrides) <= fields
            config = dataclasses.replace(conditioning.Config(), **overrides)
            assert len(config.seeds) >= 3
            conditioning.check(config)


@pytest.mark.parametrize("bad", [{"seeds": (0, 0)}, {"offsets": ()}, {"steps": 0}, {"n_train": 1}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        conditioning.check(dataclasses.replace(conditioning.Config(), **bad))
