"""bench_curvature's cold-start study and tables (small data; the benchmark itself is not run in tests)."""

from __future__ import annotations

import jax
import numpy as np

from bnjax import allocator as bnjax_allocator
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


def test_time_interleaved_samples_are_paired_rounds() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    rounds = bc.time_interleaved(fns, 3, warmup=1, samples=True)
    assert set(rounds) == {"a", "b"} and all(len(v) == 3 for v in rounds.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then round-robin: entry i of both from round i
    medians = bc.time_interleaved(fns, 3, warmup=0)
    assert all(isinstance(v, float) for v in medians.values())


def test_time_interleaved_lead_calls_precede_each_timed_call() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    rounds = bc.time_interleaved(fns, 2, warmup=0, samples=True, lead=1)
    assert all(len(v) == 2 for v in rounds.values())
    assert calls == ["a", "a", "b", "b"] * 2  # no timed call comes right after the other function's


def test_cnn_flax_batchnorm_twin_has_the_same_variables_and_outputs() -> None:
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (16, 40))
    ours, twin = bc.BNCNN(), bc.BNCNN(norm=nn.BatchNorm)
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(twin.init(jax.random.key(1), x))
    for train in (True, False):
        a = ours.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        b = twin.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for ours_leaf, twin_leaf in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # outputs and updated statistics
            np.testing.assert_allclose(np.asarray(ours_leaf), np.asarray(twin_leaf), atol=2e-5)


def test_per_round_cell_and_verdict_from_paired_ratios() -> None:
    hvp, grad = np.array([1.5, 1.52, 1.48, 1.5]), np.ones(4)
    iv = bc.stats_lib.ratio_interval(hvp, grad)
    assert bc.stats_lib.interval_verdict(iv, "below", 1.6) == "held"
    cell = bc.per_round_cell(iv._asdict())
    assert cell.startswith("1.5x [") and cell.endswith(", 4 rounds")


def test_cold_time_summary_ratios_over_initialisations_and_table_row() -> None:
    seconds = {"random": [0.2, 0.3, 0.25], "gradient": [0.1, 0.12, 0.11], "pyhessian": [0.5, 0.5, 0.55]}
    out = bc.cold_time_summary(seconds, [9, 10, 11])
    for name, verdict in (("random", "inconclusive"), ("gradient", "held")):
        d = out[f"{name}_over_pyhessian"]
        expected = np.exp(np.mean(np.log(np.asarray(seconds[name]) / np.asarray(seconds["pyhessian"]))))
        np.testing.assert_allclose(d["mean"], expected, rtol=1e-12)
        assert d["n"] == 3 and d["low"] < d["mean"] < d["high"]
        assert d["verdict_at_most_target"] == verdict
    assert out["pyhessian_hvps"] == [9, 10, 11]
    result = {
        "model": "cnn",
        "mode": "eval",
        "params": 10,
        "products": {},
        "cold": {"starts_over_seeds": {"time": out}},
    }
    row = [line for line in bc.tables([result], None).splitlines() if line.startswith("| cold time over")][0]
    assert "3 seeds (inconclusive); 0.213x [" in row and "3 seeds (held) |" in row


def test_memory_environment_reports_the_allocator_setting(monkeypatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    env = bc.memory_environment()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["transparent_hugepage"] in (None, "always", "madvise", "never")
    assert env["retain_freed_memory"] is bnjax_allocator.retained()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert bc.memory_environment()["GLIBC_TUNABLES"] is None
