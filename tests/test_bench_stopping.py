"""The offline stopping-rule study (experiments/bench_stopping.py) applies each rule and counts as it says."""

import numpy as np
import pytest

from experiments.bench_stopping import (
    SWEEP,
    Checkpoint,
    change_rule,
    evaluate,
    extrapolated_rule,
    gap_rule,
    oracle,
    over_seeds,
    ritz_sequences,
    stop_step,
    sweep,
)


def geometric(true: float, first_error: float, ratio: float, previous: float, steps: int = 8) -> Checkpoint:
    """Ritz values approaching ``true`` from below with relative errors ``first_error * ratio**j``."""
    err = first_error * ratio ** np.arange(steps)
    theta = true * (1 - err)
    theta2 = np.full(steps, 0.5 * true)
    theta2[0] = np.nan
    return Checkpoint(true, previous, theta, theta2, np.full(steps, 1e-3), tracker_hvps=0)


def test_ritz_sequences_match_eigh_of_each_leading_block():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=6), np.abs(rng.normal(size=6)) + 0.1
    theta, theta2, residual = ritz_sequences(a, b)
    for m in range(1, 7):
        t = np.diag(a[:m]) + np.diag(b[: m - 1], 1) + np.diag(b[: m - 1], -1)
        w, s = np.linalg.eigh(t)
        assert theta[m - 1] == pytest.approx(w[-1])
        assert residual[m - 1] == pytest.approx(abs(b[m - 1] * s[-1, -1]) / abs(w[-1]))
        if m > 1:
            assert theta2[m - 1] == pytest.approx(w[-2])
    assert np.isnan(theta2[0])


def test_oracle_counts_the_first_step_within_the_accuracy():
    c = geometric(10.0, 1e-2, 0.1, previous=9.0)  # errors 1e-2, 1e-3, 1e-4, ...
    assert oracle(c, accuracy=1e-3) == 2
    assert oracle(c, accuracy=1e-12) == len(c.theta) + 1  # never reached: one more than recorded


def test_change_rule_waits_for_the_value_to_settle():
    c = geometric(10.0, 1e-2, 0.1, previous=9.0)
    # changes: |theta_0 - 9| / theta_0 ~ 0.1, then 9e-3, 9e-4, 9e-5 (stop at the 4th product with tol 2e-4)
    assert stop_step(c, change_rule(2e-4, 1e-2)) == 4
    # a residual above residual_tol never stops: max_iters (the recorded length)
    assert stop_step(c, change_rule(2e-4, 1e-4)) == len(c.theta)


def test_extrapolated_rule_stops_earlier_on_fast_geometric_convergence_only():
    fast = geometric(10.0, 1e-2, 0.1, previous=9.0)
    # step 2 (third product): change 9e-4, ratio 0.1, extrapolated error 1e-4 <= 2e-4
    assert stop_step(fast, extrapolated_rule(2e-4, 1e-2)) == 3
    slow = geometric(10.0, 1e-2, 0.8, previous=9.0, steps=40)
    assert stop_step(slow, extrapolated_rule(2e-4, 1e-2)) == stop_step(slow, change_rule(2e-4, 1e-2))


def test_gap_rule_accepts_a_small_kato_temple_estimate():
    c = geometric(10.0, 1e-2, 0.5, previous=9.0)  # changes decay slowly
    # residual 1e-3, gap ~5: estimate 1e-6 * 10 / 5 = 2e-6 at step 1 (the second product)
    assert stop_step(c, gap_rule(2e-4, 1e-2)) == 2
    assert stop_step(c, change_rule(2e-4, 1e-2)) > 2


def test_gap_rule_holds_the_estimate_to_its_own_threshold():
    c = geometric(10.0, 1e-2, 0.5, previous=9.0)
    c.residual[:] = 1.2e-2  # estimate 1.44e-4 * 10 / 5 ~ 2.9e-4: above tol 2e-4, below 5e-4
    c.theta2[1:] = 5.0
    assert stop_step(c, gap_rule(2e-4, 2e-2)) > 2
    assert stop_step(c, gap_rule(2e-4, 2e-2, estimate_tol=5e-4)) == 2


def test_over_seeds_gives_the_geometric_mean_ratio_and_the_target_verdict():
    def seed(hvps: float, oracle_hvps: float, within: float) -> dict:
        return {"oracle_hvps": oracle_hvps, "rules": {"r": {"hvps_per_checkpoint": hvps, "within_accuracy": within}}}

    out = over_seeds([seed(3.0, 2.0, 0.9), seed(3.2, 2.0, 1.0), seed(3.1, 2.0, 0.95)])["r"]
    assert out["over_oracle_per_seed"] == pytest.approx([1.5, 1.6, 1.55])
    assert out["over_oracle"]["mean"] == pytest.approx((1.5 * 1.6 * 1.55) ** (1 / 3))
    assert out["target_verdict"] == "not held"  # the whole interval lies above 1.25x
    assert out["within_accuracy"]["mean"] == pytest.approx(0.95)
    close = over_seeds([seed(2.2, 2.0, 1.0), seed(2.22, 2.0, 1.0), seed(2.24, 2.0, 1.0)])["r"]
    assert close["target_verdict"] == "held"  # 1.10x to 1.12x: interval below 1.25x
    assert over_seeds([seed(2.2, 2.0, 1.0)])["r"]["target_verdict"] == "inconclusive"  # one seed decides nothing


def test_evaluate_reports_floors_and_misses():
    hit = geometric(10.0, 1e-2, 0.1, previous=9.0)  # oracle 2, change stops at 4 within 1e-3
    fooled = geometric(10.0, 5e-3, 0.999, previous=10.0 * (1 - 5e-3))  # settles 5e-3 below: a miss
    fooled.theta2[-1] = 0.99 * 10.0 * (1 - 5e-3 * 0.999**7)  # a cluster: top two Ritz values 1% apart
    out = evaluate([hit, fooled], {"change": change_rule(2e-4, 1e-2)})
    assert out["oracle_hvps"] == pytest.approx((2 + 9) / 2)
    assert out["floor_oracle_plus_one"] == pytest.approx((3 + 10) / 11)
    assert out["floor_two_products"] == pytest.approx(1.0)
    rule = out["rules"]["change"]
    assert rule["hvps_per_checkpoint"] == pytest.approx((4 + 1) / 2)
    assert rule["within_accuracy"] == pytest.approx(0.5)
    assert out["misses"]["count"] == 1 and out["misses"]["oracle_at_misses"] == [9]
    assert out["misses"]["top_gap_max_at_misses"] == pytest.approx(0.01, rel=1e-6)
    assert out["offline_change_matches_tracker"] == 0.0  # tracker_hvps=0 in these synthetic checkpoints


def test_sweep_replays_the_change_rule_at_each_setting_default_first():
    c = geometric(10.0, 1e-2, 0.1, previous=9.0)  # changes ~0.1, 9e-3, 9e-4, 9e-5, 9e-6, ...; residual 1e-3
    rows = sweep([c])
    assert [(r["tol"], r["residual_tol"]) for r in rows] == list(SWEEP)
    assert SWEEP[0] == (2e-4, 1e-2)  # the tracker's defaults
    expected = {2e-4: 4, 1e-4: 4, 5e-5: 5, 1e-5: 5}
    for r in rows:
        assert r["hvps_per_checkpoint"] == expected[r["tol"]]  # residual 1e-3 passes every residual_tol


def test_evaluate_counts_checkpoints_no_recorded_step_gets_right():
    never = geometric(10.0, 1e-2, 0.999, previous=9.0)  # stays ~1e-2 off for all 8 steps
    out = evaluate([never, geometric(10.0, 1e-2, 0.1, previous=9.0)], {"change": change_rule(2e-4, 1e-2)})
    assert out["oracle_beyond_recorded"] == pytest.approx(0.5)
