"""The eoss experiment's verdict rule on synthetic inputs: intervals, regions, and the three claims."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from experiments import eoss


def test_t_interval_matches_the_textbook_formula() -> None:
    mean, lo, hi = eoss.t_interval([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n); experiments.stats tabulates 4.303
    assert mean == 2.0 and mean - lo == pytest.approx(half, rel=1e-4) and hi - mean == pytest.approx(half, rel=1e-4)
    assert eoss.t_interval([5.0, np.nan])[1:] == (-math.inf, math.inf)  # one finite seed decides nothing
    assert math.isnan(eoss.t_interval([])[0])


@pytest.mark.parametrize(
    "low,high,region,expected",
    [
        (0.95, 1.05, (0.85, 1.15), "held"),
        (0.50, 0.60, (0.85, 1.15), "not held"),
        (1.20, 1.30, (0.85, 1.15), "not held"),
        (0.80, 1.00, (0.85, 1.15), "inconclusive"),
        (-math.inf, math.inf, (0.85, 1.15), "inconclusive"),
        (-0.3, -0.1, (-math.inf, 0.0), "held"),
        (-0.1, 0.2, (-math.inf, 0.0), "inconclusive"),
        (0.1, 0.2, (-math.inf, 0.0), "not held"),
    ],
)
def test_interval_verdict(low, high, region, expected) -> None:
    assert eoss.interval_verdict(low, high, *region) == expected


def test_interval_verdict_rejects_an_empty_interval_and_combine_rules() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        eoss.interval_verdict(2.0, 1.0, 0.0, 3.0)
    assert eoss.combine(["held", "held"]) == "held"
    assert eoss.combine(["held", "inconclusive"]) == "inconclusive"
    assert eoss.combine(["held", "inconclusive", "not held"]) == "not held"
    assert eoss.combine([]) == "inconclusive"
    np.testing.assert_allclose(eoss.tail_mean(np.arange(8.0).reshape(4, 2), 0.5), [5.0, 6.0])
    # Slope per 1000 steps over the last half: seed 0 rises 0.2 per checkpoint of 500 steps, seed 1 is flat.
    ratios = np.stack([0.2 * np.arange(6.0), np.ones(6)], axis=1)
    np.testing.assert_allclose(eoss.tail_slope(500 * np.arange(1, 7), ratios, 0.5), [0.4, 0.0], atol=1e-12)


CONFIG = dataclasses.replace(eoss.Config(), n_train=1000, batch_sizes=(32, 128, 1000), norms=("none",), lr=0.1)


def records(bs_ratio, lam_ratio, spread, seeds=3, checkpoints=10, seed=0):
    """Synthetic records: per batch size, curvature = ratio * 2/eta plus seed noise of size ``spread``."""
    rng = np.random.default_rng(seed)
    threshold = 2 / CONFIG.lr
    out = {}
    for b, r_bs, r_lam in zip(CONFIG.batch_sizes, bs_ratio, lam_ratio):
        noise = spread * rng.standard_normal((1, seeds))
        shape = (checkpoints, seeds)
        out[eoss.Setting(b, "none")] = eoss.SettingRecord(
            np.arange(1, checkpoints + 1) * 10,
            threshold * (r_bs + noise + np.zeros(shape)),
            np.full(shape, 0.1),
            threshold * (r_lam + noise + np.zeros(shape)),
            np.ones(shape, bool),
            np.full(shape, 3),
            np.full(shape, 0.1),
            np.zeros(seeds, bool),
        )
    return out


def verdicts(recs) -> list[str]:
    return [c.verdict for c in eoss._claims(CONFIG, eoss._summaries(CONFIG, recs))]


def test_claims_held_when_batch_sharpness_is_at_the_threshold_and_lambda_falls_with_the_batch() -> None:
    assert verdicts(records((1.0, 1.02, 0.99), (0.5, 0.7, 1.0), spread=0.01)) == ["held", "held", "held"]


def test_claims_not_held_when_batch_sharpness_stays_low_and_lambda_rises_with_smaller_batches() -> None:
    recs = records((0.4, 0.5, 1.0), (0.95, 0.9, 0.8), spread=0.01)
    assert verdicts(recs) == ["not held", "not held", "not held"]


def test_claims_inconclusive_when_the_seeds_disagree_too_much() -> None:
    assert verdicts(records((1.0, 1.0, 1.0), (0.8, 0.82, 0.84), spread=0.3, seed=1)) == ["inconclusive"] * 3


def test_diverged_seeds_are_left_out() -> None:
    config = dataclasses.replace(CONFIG, seeds=(0, 1, 2, 3))
    recs = records((1.0, 1.0, 1.0), (0.5, 0.7, 1.0), spread=0.01, seeds=4)
    key = eoss.Setting(32, "none")
    bs, lam = recs[key].batch_sharpness.copy(), recs[key].lambda_max.copy()
    bs[:, 3] = lam[:, 3] = np.nan
    recs[key] = recs[key]._replace(batch_sharpness=bs, lambda_max=lam, diverged=np.array([False] * 3 + [True]))
    rows = eoss._summaries(config, recs)
    assert rows[0]["diverged_seeds"] == [3] and np.isfinite(rows[0]["batch_sharpness_ratio_per_seed"]).sum() == 3
    assert [c.verdict for c in eoss._claims(config, rows)] == ["held", "held", "held"]
