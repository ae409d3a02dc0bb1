"""bench_curvature's cold-start study and tables (small data; the benchmark itself is not run in tests)."""

from __future__ import annotations

import jax
import numpy as np

from experiments import bench_curvature as bc


def test_start_study_counts_both_starts_per_initialisation() -> None:
    x = jax.random.normal(jax.random.key(0), (64, 40))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    cfg = bc.Config(start_seeds=(0, 1), start_keys=2)
    out = bc.start_study("mlp", "eval", x, y, cfg)
    assert out["seeds"] == [0, 1]
    for name in ("random_hvps", "gradient_hvps"):
        counts = np.asarray(out[name])
        assert counts.shape == (2, 2) and np.all((counts >= 1) & (counts <= 41))
    expected = np.exp(np.mean(np.log(np.mean(out["gradient_hvps"], 1) / np.mean(out["random_hvps"], 1))))
    np.testing.assert_allclose(out["gradient_over_random"]["mean"], expected, rtol=1e-12)
    assert out["verdict_fewer"] in ("held", "not held", "inconclusive")


def test_tables_mark_missing_parts() -> None:
    result = {"model": "mlp", "mode": "eval", "params": 10, "products": {"grad_ms": 1.0}}
    text = bc.tables([result], "PyHessian comparison skipped (--no-peer).")
    assert "| parameters | 10 |" in text and "| gradient, plain jit (ms) | 1.0 |" in text
    assert "| – |" in text and text.endswith("PyHessian comparison skipped (--no-peer).")
