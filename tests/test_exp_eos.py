"""The eos experiment over seeds: per-run verdicts combined per setting and per claim, the per-setting interval,
and the report's setting, reading and rule (a two-seed smoke run and constructed records)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from experiments import cli, eos, report, stats


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        (["held", "held", "held"], "held"),
        (["held", "diverged", "held"], "held"),  # a diverged seed is reported, left out
        (["diverged", "diverged"], "diverged"),
        (["held", "not reached", "held"], "not reached"),
        (["held", "not reached", "not held"], "not held"),
        (["held", "too short", "diverged"], "too short"),
    ],
)
def test_seed_verdict_combines_the_runs_of_a_setting(verdicts, expected):
    assert eos.seed_verdict(verdicts) == expected


SPEC = eos.RunSpec("gd", 0.1, "none")
THRESHOLD = 20.0


def _record(ratios, diverged_at=-1):
    """A constructed run: sharpness = ratio x 2/0.1 at checkpoints every 10 steps, a falling loss with bumps."""
    ratios = np.asarray(ratios, np.float32)
    n = ratios.size
    losses = np.exp(-np.arange(10 * n) / 50.0) * (1 + 0.05 * (np.arange(10 * n) % 2))
    return eos.RunRecord(
        losses.astype(np.float32),
        10 * np.arange(1, n + 1),
        ratios * THRESHOLD,
        (ratios * THRESHOLD)[:, None],
        np.full(n, THRESHOLD, np.float32),
        np.full(n, 3),
        np.full(n, 1e-4, np.float32),
        np.ones(n, bool),
        losses[9::10].astype(np.float32),
        "non-finite training loss" if diverged_at >= 0 else "",
        diverged_at,
    )


HELD = [0.5, 0.9, 1.0, 1.01, 1.02, 1.0, 1.01, 1.02]
NOT_REACHED = [0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8]
CONFIG = dataclasses.replace(
    eos.Config(), seeds=(0, 1, 2), steps=80, track_every=10, gd_lrs=(0.1,), norms=("none",), topk=1
)


def _outcome(config, seeds_ratios, tmp_path, diverged=()):
    recs = [_record(r, 10 if i in diverged else -1) for i, r in enumerate(seeds_ratios)]
    return eos._outcome(config, types.SimpleNamespace(name="mnist1d"), {SPEC: recs}, tmp_path)


def test_claim_over_seeds_held_with_a_diverged_seed_and_its_interval(tmp_path):
    seeds = [HELD, [r * 1.01 for r in HELD], [0.5, float("nan")]]
    outcome = _outcome(CONFIG, seeds, tmp_path, diverged=(2,))
    setting = outcome.results["settings"][0]
    assert setting["seed_verdicts"] == ["held", "held", "diverged"] and setting["verdict"] == "held"
    assert setting["diverged_seeds"] == [2]
    # The per-setting ratio: each seed's mean over the last 25% of its checkpoints, then mean and 95% interval.
    want = stats.interval([np.mean(HELD[-2:]), np.mean(HELD[-2:]) * 1.01])
    got = setting["window_ratio"]
    assert got["n"] == 2 and got["mean"] == pytest.approx(want.mean, rel=1e-5)
    assert got["low"] == pytest.approx(want.low, rel=1e-5) and got["high"] == pytest.approx(want.high, rel=1e-5)
    gd = outcome.claims[0]
    assert gd.verdict == "held" and "2 held, 1 diverged" in gd.measured
    assert f"{want.mean:.3f} [{want.low:.3f}, {want.high:.3f}]" in gd.measured
    assert "95% CIs" in gd.effect


def test_claim_over_seeds_one_seed_not_reaching_makes_it_inconclusive_and_the_quick_form_too_short(tmp_path):
    seeds = [HELD, HELD, NOT_REACHED]
    full = _outcome(CONFIG, seeds, tmp_path)
    assert full.results["settings"][0]["verdict"] == "not reached"
    assert full.claims[0].verdict == "inconclusive"
    quick = _outcome(dataclasses.replace(CONFIG, short_run=True), seeds, tmp_path)
    assert quick.results["settings"][0]["seed_verdicts"] == ["held", "held", "too short"]
    assert quick.claims[0].verdict == "too short to judge"
    # The loss claim is judged on the runs that held: both decrease with step-to-step increases.
    assert full.claims[-1].verdict == "held" and "2 of 2 runs decreased" in full.claims[-1].effect


def test_claim_over_seeds_not_held_when_a_seed_leaves_the_band(tmp_path):
    left = HELD[:-2] + [1.3, 1.4]
    outcome = _outcome(CONFIG, [HELD, left, HELD], tmp_path)
    assert outcome.results["settings"][0]["verdict"] == "not held" and outcome.claims[0].verdict == "not held"


@pytest.fixture(scope="module")
def two_seed_smoke(tmp_path_factory):
    """A smoke config with two seeds, a GD setting that trains and one that diverges at every seed."""
    out = tmp_path_factory.mktemp("eos2")
    config = dataclasses.replace(
        eos.PRESETS["smoke"], seeds=(0, 1), gd_lrs=(0.1, 1e3), adam_lrs=(), schedule_lrs=(), steps=20
    )
    outcome = cli.execute("eos", eos, config, out, "smoke", "python -m experiments eos --smoke --seeds 0,1")
    return outcome, (out / "report.md").read_text()


def test_two_seed_smoke_report_has_setting_reading_rule_and_intervals(two_seed_smoke):
    outcome, text = two_seed_smoke
    assert "## Setting" in text and "| seeds | 2 (0, 1) |" in text and "## Reading" in text
    assert "edge of stability" in outcome.reading and "2 seeds each" in outcome.reading
    assert "Verdict rule: a run (setting x seed)" in text and "a setting, over its seeds" in text
    trained = next(s for s in outcome.results["settings"] if s["lr"] == 0.1)
    iv = trained["window_ratio"]
    assert iv["n"] == 2 and f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]" in text
    diverged = next(s for s in outcome.results["settings"] if s["lr"] == 1e3)
    assert diverged["verdict"] == "diverged" and diverged["seed_verdicts"] == ["diverged", "diverged"]
    assert "diverged at every seed (excluded)" in text
    assert {c.verdict for c in outcome.claims} <= set(report.VERDICTS) and all(c.effect for c in outcome.claims)


def test_the_word_failed_is_never_a_verdict(two_seed_smoke, tmp_path):
    _, text = two_seed_smoke
    assert "failed" not in text.lower()
    quick = _outcome(dataclasses.replace(CONFIG, short_run=True), [HELD, NOT_REACHED, HELD], tmp_path)
    words = [quick.rule, quick.reading, *quick.notes, *(c.measured + c.verdict for c in quick.claims), *quick.tables]
    assert not any("failed" in w.lower() for w in words)


def test_report_numbers_have_one_format_per_column(two_seed_smoke):
    _, text = two_seed_smoke
    assert "None" not in text and "nan" not in text.lower()
    assert "e+0" not in text  # thresholds and sharpness in plain digits, not 3.8e+04


def test_matrix_and_choices():
    assert set(eos.MATRIX) == {"mlp"}
    quick = dataclasses.replace(eos.Config(), **eos.MATRIX["mlp"]["quick"])
    full = dataclasses.replace(eos.Config(), **eos.MATRIX["mlp"]["full"])
    assert quick.short_run and quick.steps == eos.PRESETS["quick"].steps and len(quick.seeds) >= 3
    assert full == eos.Config()
    assert eos.Config().seeds == (0, 1, 2) and eos.PRESETS["quick"].seeds == (0,)
    assert set(eos.CHOICES) <= {f.name for f in dataclasses.fields(eos.Config)}
    with pytest.raises(ValueError, match="seeds must be distinct"):
        eos.run(dataclasses.replace(eos.PRESETS["smoke"], seeds=(0, 0)), None)


def test_effect_ranges_over_the_intervals_and_says_where_one_seed_gives_none():
    def summary(mean, low, high, n):
        return {"window_ratio": {"mean": mean, "low": low, "high": high, "n": n}}

    three = [summary(1.0, 0.99, 1.01, 3), summary(1.05, 1.02, 1.08, 3)]
    assert eos._effect(three) == "0.990-1.080x threshold (2 settings, 95% CIs)"
    mixed = [summary(1.0, 0.99, 1.01, 3), summary(1.2, -np.inf, np.inf, 1), summary(np.nan, -np.inf, np.inf, 0)]
    assert eos._effect(mixed) == "0.990-1.200x threshold (2 settings, 95% CIs; 1 from one seed); 1 diverged"
    assert eos._effect(mixed[-1:]) == "every setting diverged"
