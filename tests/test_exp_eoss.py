"""The eoss report: setting, reading and rule of the smoke form, per-setting intervals over its two seeds, claim
effects, a diverged seed marked, and no run verdict called "failed"."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from experiments import cli, eoss, report, stats


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("eoss")
    config = eoss.PRESETS["smoke"]
    outcome = cli.execute("eoss", eoss, config, out, "smoke", "python -m experiments eoss --smoke")
    return config, outcome, (out / "report.md").read_text()


def test_smoke_report_has_setting_reading_rule_and_the_seed_interval(smoke):
    config, outcome, text = smoke
    assert len(config.seeds) == 2
    assert "## Setting" in text and "| seeds | 2 (0, 1) |" in text and "## Reading" in text
    assert "edge of stability" in outcome.reading and "batch sharpness" in outcome.reading
    assert "Verdict rule: per run the statistic" in text and "Verdict rule: Verdict rule" not in text
    row = outcome.results["settings"][0]
    per_seed = row["batch_sharpness_ratio_per_seed"]
    iv = stats.interval(per_seed)
    assert iv.n == 2 and row["batch_sharpness_ratio"] == pytest.approx([iv.mean, iv.low, iv.high])
    assert f"{iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}]" in text
    assert all(c.effect for c in outcome.claims) and {c.verdict for c in outcome.claims} <= set(report.VERDICTS)


def test_smoke_report_words_and_number_formats(smoke):
    _, _, text = smoke
    assert "failed" not in text.lower() and "None" not in text and "nan" not in text.lower()
    assert "inf" not in text.replace("information", "")


def test_interval_and_effect_formats():
    assert eoss._fmt_interval((1.0, 0.9, 1.1)) == "1.000 [0.900, 1.100]"
    assert eoss._fmt_interval((1.0, -math.inf, math.inf)) == "1.000 (1 seed)"
    assert eoss._fmt_interval((math.nan, -math.inf, math.inf)) == "–"
    assert eoss._fmt_interval((-0.1, -0.2, 0.05), signed=True) == "-0.100 [-0.200, +0.050]"
    two = [(1.0, 0.9, 1.1), (0.5, 0.4, 0.6)]
    assert eoss._range_effect(two, "x 2/eta") == "0.40 to 1.10x 2/eta (2 settings, 95% CIs)"
    assert eoss._range_effect([(1.0, -math.inf, math.inf)], "x 2/eta") == "1.00 to 1.00x 2/eta (1 setting, no CI)"


def _record(seeds=3, checkpoints=8, diverged=()):
    """Batch sharpness at 2/eta, lambda_max at half of it; the seeds in ``diverged`` become NaN after 2 checkpoints."""
    threshold = 2 / eoss.Config().lr
    shape = (checkpoints, seeds)
    rng = np.random.default_rng(0)
    bs = threshold * (1 + 0.01 * rng.standard_normal(shape))
    lam = 0.5 * bs
    div = np.zeros(seeds, bool)
    for s in diverged:
        bs[2:, s] = lam[2:, s] = np.nan
        div[s] = True
    return eoss.SettingRecord(
        50 * np.arange(1, checkpoints + 1),
        bs,
        np.full(shape, 0.1),
        lam,
        np.ones(shape, bool),
        np.full(shape, 4),
        np.full(shape, 0.1),
        div,
    )


def test_a_diverged_seed_is_reported_and_left_out(tmp_path):
    config = dataclasses.replace(eoss.Config(), seeds=(0, 1, 2, 3), batch_sizes=(32,), norms=("none",), steps=400)
    setting = eoss.Setting(32, "none")
    outcome = eoss._outcome(config, {setting: _record(4, diverged=(3,))}, {setting: 1.0}, tmp_path, "mnist1d")
    row = outcome.results["settings"][0]
    assert row["diverged_seeds"] == [3] and np.isfinite(row["batch_sharpness_ratio_per_seed"]).sum() == 3
    assert outcome.claims[0].verdict == "held" and outcome.claims[1].verdict == "held"
    assert (tmp_path / "eoss.png").exists()
    table = outcome.tables[0]
    assert "| none | 32 |" in table and "| 3 |" in table  # the diverged seed, by name


def test_matrix_and_choices():
    assert set(eoss.MATRIX) == {"mlp"}
    for form in ("quick", "full"):
        config = dataclasses.replace(eoss.Config(), **eoss.MATRIX["mlp"][form])
        assert len(config.seeds) >= 3
    assert set(eoss.CHOICES) <= {f.name for f in dataclasses.fields(eoss.Config)}
