"""The start-vector study (experiments/bench_start_vectors.py): its Ritz vectors, start vectors and chains."""

import numpy as np
import pytest

from experiments.bench_start_vectors import (
    STARTS,
    Config,
    Start,
    ritz_vectors,
    run_seed,
    start_vector,
    summarise,
    table,
)
from experiments.bench_stopping import STEPS
from experiments.bench_warmstart import mnist1d_train


def numpy_lanczos(a: np.ndarray, x0: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``m`` Lanczos steps with full reorthogonalization (float64): alphas, betas, basis rows."""
    q = np.zeros((m, len(x0)))
    alphas, betas = np.zeros(m), np.zeros(m)
    q[0] = x0 / np.linalg.norm(x0)
    for j in range(m):
        w = a @ q[j]
        alphas[j] = q[j] @ w
        w = w - q[: j + 1].T @ (q[: j + 1] @ w)
        w = w - q[: j + 1].T @ (q[: j + 1] @ w)
        betas[j] = np.linalg.norm(w)
        if j + 1 < m:
            q[j + 1] = w / betas[j]
    return alphas, betas, q


def test_ritz_vectors_are_the_rayleigh_ritz_pairs_of_the_krylov_space():
    rng = np.random.default_rng(0)
    n = 12
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = u @ np.diag(np.linspace(-1.0, 5.0, n)) @ u.T
    alphas, betas, q = numpy_lanczos(a, rng.normal(size=n), n)
    full = ritz_vectors(alphas, betas, q, n)  # the whole space: the eigenvectors of a
    w, vecs = np.linalg.eigh(a)
    assert abs(full[0] @ vecs[:, -1]) == pytest.approx(1.0, abs=1e-9)
    assert abs(full[1] @ vecs[:, -2]) == pytest.approx(1.0, abs=1e-9)
    part = ritz_vectors(alphas, betas, q, 4)  # 4 steps: pairs of q[:4] a q[:4]^T, in the span of q[:4]
    t, s = np.linalg.eigh(q[:4] @ a @ q[:4].T)
    for row, col in ((0, -1), (1, -2)):
        assert np.allclose(part[row] @ q[:4].T @ q[:4], part[row], atol=1e-10)
        assert part[row] @ a @ part[row] == pytest.approx(t[col])
        assert abs(part[row] @ (q[:4].T @ s[:, col])) == pytest.approx(1.0)
    assert np.all(ritz_vectors(alphas, betas, q, 1)[1] == 0)  # one step: no second Ritz vector


def test_start_vectors_mix_the_unit_extra_vector_at_its_weight():
    top, second = np.eye(4)[0], np.eye(4)[1]
    vectors = np.stack([top, second])
    g = np.array([0.0, 0.0, 3.0, 4.0])
    assert np.array_equal(start_vector(Start("previous"), vectors, None), top)
    assert np.allclose(start_vector(Start("s", "second", 1.0), vectors, None), (top + second) / np.sqrt(2))
    mixed = start_vector(Start("g", "gradient", 0.5), vectors, g)
    expected = top + 0.5 * g / 5
    assert np.allclose(mixed, expected / np.linalg.norm(expected))
    assert np.array_equal(start_vector(Start("g", "gradient", 0.5), vectors, np.zeros(4)), top)
    assert np.array_equal(start_vector(Start("s", "second", 1.0), np.stack([top, np.zeros(4)]), None), top)


def test_chains_on_a_short_run_follow_the_tracker_and_summarise():
    x, y = mnist1d_train(1000)
    chains, same = run_seed(x, y, Config(gd_steps=20), seed=0)
    assert same == 1.0  # the `previous` chain spends the real tracker's HVPs
    assert set(chains) == {s.name for s in STARTS}
    for cps in chains.values():
        assert len(cps) == 2  # warm checkpoints at steps 10 and 20
        for c in cps:
            assert len(c.theta) == STEPS and np.isfinite(c.true) and 1 <= c.tracker_hvps <= STEPS
    # the same GD trajectory and reference for every chain
    assert len({tuple(c.true for c in cps) for cps in chains.values()}) == 1
    results = summarise([chains], (0,))
    assert [r["start"]["name"] for r in results] == [s.name for s in STARTS]
    assert results[0]["rules"]["change"]["hvps_per_checkpoint"] == np.mean([c.tracker_hvps for c in chains["previous"]])
    assert table(results).count("\n") == len(STARTS) + 1
