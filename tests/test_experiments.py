"""Tests of the experiments package: every experiment end to end (smoke preset), golden training values,
the losses against a float64 NumPy forward pass, the edge-of-stability verdict, data determinism, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax.loops
import experiments
from experiments import EXPERIMENTS, cli, data, eos, models, report, train

# name -> keys its results.json must hold (besides runtime_s)
RESULT_KEYS = {
    "eos": ["runs", "settings", "verdict_rule", "n_train", "dataset"],
    "eoss": ["settings", "threshold", "verdict_rule", "n_train"],
    "smoothness": ["runs"],
    "covariate_shift": ["runs", "effects"],
    "robustness": ["grid", "seeds", "best_test_accuracy", "good_counts", "effects", "none", "bn"],
    "batch_size": ["runs", "effects"],
    "conditioning": ["runs", "effects"],
    "inference_stats": ["runs"],
    "claims": ["form", "cells", "runtime_entries_s"],
}


def test_every_experiment_is_tested():
    assert set(RESULT_KEYS) == set(EXPERIMENTS)


# eos also exercises its data-parallel path (sharded jit over 2 of conftest's 8 CPU devices).
EXTRA_ARGS = {"eos": ["--devices", "2"]}


@pytest.mark.parametrize("name", sorted(RESULT_KEYS))
def test_smoke_run_writes_report(name, tmp_path):
    out = tmp_path / name
    assert cli.main([name, "--smoke", "--out", str(out), *EXTRA_ARGS.get(name, [])]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == name and config["preset"] == "smoke"
    results = json.loads((out / "results.json").read_text())
    for key in RESULT_KEYS[name] + ["runtime_s"]:
        assert key in results, key
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "| claim | measured | verdict |" in report
    assert any(f"**{v}**" in report for v in experiments.report.VERDICTS)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all(f"![{p}]({p})" in report for p in pngs)


# Computed once with this code: MLP(features=(16,), tanh, seed 0), 5 full-batch GD steps at lr 0.1, square
# loss, on the first 64 MNIST-1D training examples (data seed 42). A change here is a change of behaviour.
GOLDEN = {
    "none": [2.9770398139953613, 1.8743568658828735, 1.3893229961395264, 1.1206209659576416, 0.9503374099731445],
    "bn": [3.092410087585449, 2.062711238861084, 1.5405044555664062, 1.227843165397644, 1.0264637470245361],
}


def _golden_setup(norm):
    ds = data.subset(data.mnist1d(42), 64)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    model = models.MLP(features=(16,), norm=norm, activation="tanh")
    optimizer = optax.sgd(0.1)
    return model, optimizer, train.init_train_state(model, x[:2], optimizer, 0), x, y


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_golden_training_steps(norm):
    model, optimizer, state, x, y = _golden_setup(norm)
    run = train.full_batch_runner(train.make_train_step(model, "square", optimizer))
    _, metrics = run(state, x, y, 5)
    np.testing.assert_allclose(np.asarray(metrics.loss), GOLDEN[norm], rtol=2e-5)


def _numpy_forward(params, x, norm):
    """float64 forward pass of MLP(features=(16,), tanh) in train mode, written out by hand."""
    h = x.astype(np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64)
    if norm == "none":
        h = h + np.asarray(params["Dense_0"]["bias"], np.float64)
    else:
        bn = params["_NormAct_0"]["BatchNorm_0"]
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
    h = np.tanh(h)
    return h @ np.asarray(params["Dense_1"]["kernel"], np.float64) + np.asarray(params["Dense_1"]["bias"])


@pytest.mark.parametrize("norm", ["none", "bn"])
@pytest.mark.parametrize("loss", ["square", "cross_entropy"])
def test_train_loss_matches_numpy(norm, loss):
    model, _, state, x, y = _golden_setup(norm)
    logits = _numpy_forward(state.params, np.asarray(x), norm)
    y = np.asarray(y)
    if loss == "square":
        expected = 0.5 * np.mean(np.sum((logits - np.eye(10)[y]) ** 2, axis=1))
    else:
        z = logits - logits.max(1, keepdims=True)
        expected = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
    value, _ = train.make_loss_fn(model, loss)(
        state.params, state.batch_stats, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0)
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_sharded_full_batch_training_matches_one_device():
    """The eos --devices path: the same GD trajectory (BN statistics of the full batch) on 4 devices."""
    model, optimizer, state, x, y = _golden_setup("bn")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    examples = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    run = train.full_batch_runner(train.make_train_step(model, "square", optimizer))
    _, sharded = run(state, jax.device_put(x, examples), jax.device_put(y, examples), 5)
    np.testing.assert_allclose(np.asarray(sharded.loss), GOLDEN["bn"], rtol=2e-5)


def test_eos_rejects_devices_not_dividing_the_data():
    with pytest.raises(ValueError, match="devices must be"):
        eos.run(dataclasses.replace(eos.PRESETS["smoke"], devices=3), None)


def test_eos_devices_tracker_is_data_parallel_and_matches_one_device():
    """eos --devices 4 with ghost batches: the tracker runs with shards=4 (chunk c = the c-th 25 rows of every
    device's 50); its sharpness equals the one-device run on the rows permuted into the same chunks."""
    config = dataclasses.replace(eos.PRESETS["smoke"], steps=10, track_every=10, chunk_size=100, devices=4)
    spec = eos.RunSpec("gd", 0.1, "bn")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(config.n_train, 40)).astype(np.float32)
    y = rng.integers(0, 10, config.n_train).astype(np.int32)
    perm = np.arange(config.n_train).reshape(4, -1)
    perm = np.concatenate([perm[:, :25].ravel(), perm[:, 25:].ravel()])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    examples = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    (sharded,) = eos._train_spec(spec, config, *jax.device_put((x, y), examples), 10)
    one = dataclasses.replace(config, devices=1)
    (want,) = eos._train_spec(spec, one, jnp.asarray(x[perm]), jnp.asarray(y[perm]), 10)
    assert sharded.sharpness.shape == (1,) and not sharded.diverged
    np.testing.assert_allclose(sharded.sharpness, want.sharpness, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of devices"):
        eos.run(dataclasses.replace(eos.PRESETS["smoke"], chunk_size=50, devices=8), None)


def test_divergence_stops_with_clear_error():
    model, _, _, x, y = _golden_setup("none")
    optimizer = optax.sgd(1e6)
    state = train.init_train_state(model, x[:2], optimizer, 0)
    run = train.full_batch_runner(train.make_train_step(model, "square", optimizer))
    with pytest.raises(train.Diverged, match=r"non-finite training loss .* at step \d+ \(probe\)"):
        train.train_in_segments(run, state, x, y, num_steps=40, every=10, label="probe")


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ([0.2, 0.5, 0.8, 0.9], ("not reached", 0.0)),
        ([0.5, 1.0, 1.02, 0.97, 1.05, 1.0, 0.99, 1.08], ("held", 1.0)),
        ([0.5, 1.0, 1.02, 0.97, 1.05, 1.0, 0.99, 0.5], ("not held", 0.5)),  # window = last 2 of 8
        ([0.5, 1.2, 1.3, 1.25], ("not held", 0.0)),
    ],
)
def test_eos_verdict(ratios, expected):
    assert eos.run_verdict(np.array(ratios), eos.Config()) == expected


@pytest.mark.parametrize(
    "verdicts, full, quick",
    [
        (["held", "held"], "held", "held"),
        (["held", "diverged"], "held", "held"),  # a diverged run is reported, not counted
        (["held", "not held"], "not held", "too short to judge"),
        (["held", "not reached"], "inconclusive", "too short to judge"),
        (["not reached", "not held"], "not held", "too short to judge"),
        (["diverged"], "inconclusive", "too short to judge"),
    ],
)
def test_eos_claim_verdict_quick_form_never_refutes(verdicts, full, quick):
    """The rule printed in the report: the quick form confirms ("held") or says "too short to judge", never
    "not held" or "inconclusive" (the main job's quick run must not refute what the full run confirms)."""
    assert eos.claim_verdict(verdicts, quick=False) == full
    assert eos.claim_verdict([eos.judged(v, eos.PRESETS["quick"]) for v in verdicts], quick=True) == quick
    assert {eos.judged(v, eos.PRESETS["quick"]) for v in ("not held", "not reached")} == {"too short"}
    assert eos.judged("not held", eos.Config()) == "not held"


def test_eos_reports_a_top_k_run_that_diverged_before_its_first_checkpoint(tmp_path):
    """GD at lr 0.2 with BN diverges within the first segment of the full flagship: its top-k record is empty,
    and the report must say "diverged" for it (not fail on the empty record)."""
    config = dataclasses.replace(eos.PRESETS["smoke"], gd_lrs=(0.1, 1e3), adam_lrs=(), schedule_lrs=(), steps=20)
    outcome = eos.run(config, tmp_path)
    verdicts = {r["lr"]: r["verdict"] for r in outcome.results["runs"]}
    assert verdicts[1e3] == "diverged" and verdicts[0.1] != "diverged"


def test_eos_smoke_report_uses_the_quick_rule_and_the_schedule_threshold(tmp_path):
    """The smoke form (short, like --quick) reports only held / too short to judge, and its step-schedule run
    records the threshold of each checkpoint's learning rate (2/0.05 before mid-run, 2/0.1 after)."""
    config = eos.PRESETS["smoke"]
    outcome = eos.run(config, tmp_path)
    assert {c.verdict for c in outcome.claims} <= {"held", "too short to judge"}
    sched = [r for r in outcome.results["runs"] if r["optimizer"] == "gd-schedule"]
    assert [(r["lr"], r["lr_after"]) for r in sched] == [(0.05, 0.1)]
    rule = eos.stability_rule(eos.RunSpec("gd-schedule", 0.05, "bn", 0.1), config)
    assert rule.threshold_at(config.steps // 2 - 1) == pytest.approx(40.0)
    assert rule.threshold_at(config.steps // 2) == pytest.approx(20.0)
    assert sched[0]["threshold"] == pytest.approx(20.0)


def test_eos_thresholds():
    config = eos.Config()
    assert eos.stability_rule(eos.RunSpec("gd", 0.1, "bn"), config).threshold == pytest.approx(20.0)
    assert eos.stability_rule(eos.RunSpec("momentum", 0.1, "bn"), config).threshold == pytest.approx(38.0)
    assert eos.stability_rule(eos.RunSpec("adam", 0.001, "none"), config).threshold == pytest.approx(38000.0)


def test_mnist1d_split_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BNJAX_CACHE_DIR", str(tmp_path))
    data.mnist1d.cache_clear()
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    fresh = data.mnist1d(7)  # generated, then written to the cache
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)  # global RNGs untouched
    assert fresh.x_train.shape == (4000, 40) and fresh.x_test.shape == (1000, 40)
    assert fresh.x_train.dtype == np.float32 and fresh.y_train.dtype == np.int32
    assert set(np.unique(fresh.y_train)) == set(range(10))
    assert len(list(tmp_path.glob("mnist1d-*seed7.npz"))) == 1
    data.mnist1d.cache_clear()
    cached = data.mnist1d(7)
    for a, b in zip(fresh[1:5], cached[1:5]):
        np.testing.assert_array_equal(a, b)
    data.mnist1d.cache_clear()


def test_digits_split_deterministic():
    a, b, c = data.digits(1), data.digits(1), data.digits(2)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_train.shape[1:] == (8, 8, 1) and len(a.x_test) == 300 and len(a.x_train) == 1497
    assert not np.array_equal(a.y_test, c.y_test)


def test_npz_dataset(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path, x_train=rng.normal(size=(6, 3)), y_train=[0, 1, 2, 0, 1, 2], x_test=rng.normal(size=(2, 3)), y_test=[1, 2]
    )
    ds = data.load(f"npz:{path}")
    assert ds.num_classes == 3 and ds.x_train.dtype == np.float32
    np.savez(path, x_train=np.zeros((2, 3)), y_train=[0, 1])
    with pytest.raises(ValueError, match="lacks the arrays"):
        data.load(f"npz:{path}")


def test_cli_parses_fields_and_presets(capsys):
    parser = cli._experiment_parser("eos", eos)
    args = parser.parse_args(["--quick", "--gd-lrs", "0.05,0.1", "--steps", "300", "--momentum-lrs", ""])
    assert args.quick and args.gd_lrs == (0.05, 0.1) and args.steps == 300 and args.momentum_lrs == ()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "eos" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["nonexistent"])


def test_models_reject_bad_options():
    x = jnp.ones((4, 40))
    with pytest.raises(ValueError, match="norm must be one of"):
        models.MLP(norm="layer").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="Unknown model"):
        models.make_model("resnet")
    with pytest.raises(ValueError, match="VGG expects images"):
        models.VGG().init(jax.random.PRNGKey(0), x)


def test_cli_list_options_accept_the_form_help_prints():
    parser = cli._experiment_parser("eos", eos)
    args = parser.parse_args(
        [
            "--hidden",
            "(32, 32)",
            "--gd-lrs",
            "[0.05, 0.1]",
            "--norms",
            "('none', 'bn')",
            "--adam-lrs",
            "0.001",
            "--momentum-lrs",
            "()",
        ]
    )
    assert args.hidden == (32, 32) and args.gd_lrs == (0.05, 0.1) and args.norms == ("none", "bn")
    assert args.adam_lrs == (0.001,) and args.momentum_lrs == ()
    assert "default: --hidden 200,200" in parser.format_help()  # the form --help prints


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--gd-lrs", "abc", r"argument --gd-lrs: expected a comma-separated list of numbers, e\.g\. 0\.05,0\.1"),
        ("--hidden", "(32, x)", r"argument --hidden: expected a comma-separated list of integers"),
        ("--steps", "1.5", r"argument --steps: expected an integer, got '1\.5'"),
    ],
)
def test_cli_bad_option_is_one_line_and_exit_2(option, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eos", "--smoke", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(expected, err), err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eos", "--gd-lrs", "0.1,inf"], r"argument --gd-lrs: .*got '0\.1,inf' \(expected a finite number"),
        (["robustness", "--lrs", "0.1,nan"], r"argument --lrs: .*expected a finite number, got 'nan'"),
        (["eos", "--init-scale", "nan"], r"argument --init-scale: expected a finite number, got 'nan'"),
        (["eos", "--gd-lrs", "0.1,0.1"], r"gd_lrs must be distinct finite positive learning rates"),
        (["eos", "--verdict-window", "5"], r"verdict_window must be a fraction in \(0, 1\], got 5\.0"),
        (["eos", "--min-in-band", "2"], r"min_in_band must be a fraction in \(0, 1\]"),
        (["eos", "--norms", "bn,bn"], r"norms must be distinct"),
        (["eos", "--norms="], r"norms is empty"),
        (["eos", "--hidden=-5"], r"hidden must be one or more positive layer widths"),
        (["smoothness", "--seeds", "0,0"], r"seeds must name distinct seeds"),
        (["smoothness", "--lrs", "0.1,-0.1"], r"lrs must be one or more distinct positive learning rates"),
        (["smoothness", "--steps", "0"], r"steps \(0\) must be a positive multiple of measure_every"),
        (["inference_stats", "--torch-momenta", "5"], r"torch_momenta must be in \[0, 1\] or 'none', got '5'"),
        (["inference_stats", "--lr=-1"], r"lr must be positive, got -1\.0"),
        (["inference_stats", "--steps", "0"], r"steps \(0\) must be a positive multiple of segment"),
        (["eoss", "--steps", "0"], r"steps \(0\) must be a positive multiple of track_every"),
    ],
)
def test_cli_bad_values_fail_before_any_run_folder(argv, expected, tmp_path, capsys):
    """Each is refused before a run folder exists (they used to be checked inside the run, after earlier
    settings had trained, or not at all: duplicate seeds gave zero-width intervals and "held" claims)."""
    out = tmp_path / "run"
    try:
        code = cli.main([argv[0], "--smoke", *argv[1:], "--out", str(out)])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(expected, err), err
    assert not out.exists()


def test_sigterm_marks_the_run_interrupted(tmp_path):
    """A run killed by SIGTERM (a scheduler, `timeout`) kept the status "running"; it is "interrupted" now."""
    out, root = tmp_path / "run", pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "experiments", "eos", "--smoke", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (out / "results.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"


def _bad_npz(tmp_path, kind):
    path = tmp_path / "d.npz"
    if kind == "missing-file":
        return tmp_path / "nope.npz", r"No such file"
    if kind == "missing-key":
        np.savez(path, x_train=np.zeros((2, 3)), y_train=[0, 1])
        return path, r"lacks the arrays \['x_test', 'y_test'\]"
    if kind == "lengths":
        np.savez(path, x_train=np.zeros((3, 3)), y_train=[0, 1], x_test=np.zeros((2, 3)), y_test=[0, 1])
        return path, r"one per row of x_train"
    path.write_text("not an npz")
    return path, r"not a readable \.npz"


@pytest.mark.parametrize("kind", ["missing-file", "missing-key", "lengths", "not-npz"])
def test_cli_data_set_error_is_one_line_and_exit_2(kind, tmp_path, capsys):
    path, expected = _bad_npz(tmp_path, kind)
    out = tmp_path / "run"
    assert cli.main(["eos", "--smoke", "--dataset", f"npz:{path}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--dataset npz:" in err and re.search(expected, err), err
    assert not out.exists()  # checked before anything is written
    with pytest.raises(cli.UserError):
        cli.main(["eos", "--smoke", "--dataset", f"npz:{path}", "--out", str(out), "--debug"])


def test_cli_unusable_out_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(blocker, "exists and is not a folder"), (blocker / "sub", "cannot create the output folder")]
    for out, expected in cases:
        assert cli.main(["eos", "--smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert cli.main(["eos", "--smoke", "--out", str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "holds no experiment run" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").exists()


def _fake_run(behaviour):
    """A stand-in for an experiment's run(config, out): checks the folder says 'running', then acts."""

    def run(config, out):
        assert json.loads((out / "results.json").read_text())["status"] == "running"
        assert "Status: **running**" in (out / "report.md").read_text()
        if behaviour == "complete":
            (out / "new.png").write_bytes(b"png")
            return report.Outcome({"x": 1}, [report.Claim("c", "m", "held")], figures=["new.png"])
        raise behaviour

    return run


def test_cli_run_status_and_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["eos", "--smoke", "--out", str(out)]
    monkeypatch.setattr(eos, "run", _fake_run("complete"))
    assert cli.main(args) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert "Status: **complete**" in (out / "report.md").read_text()
    capsys.readouterr()
    # A folder holding a run is refused, then replaced with --overwrite (old files removed first).
    assert cli.main(args) == 2
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    (out / "old.png").write_bytes(b"old")
    monkeypatch.setattr(eos, "run", _fake_run(ValueError("devices must divide n_train")))
    assert cli.main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "devices must divide n_train" in err and "marked failed" in err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "ValueError: devices must divide n_train" in results["error"]
    assert "Status: **failed**" in (out / "report.md").read_text() and not (out / "old.png").exists()
    # An unexpected error keeps its traceback (exit 1 from Python) but still marks the run failed.
    monkeypatch.setattr(eos, "run", _fake_run(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(args + ["--overwrite"])
    assert json.loads((out / "results.json").read_text())["status"] == "failed"
    monkeypatch.setattr(eos, "run", _fake_run(KeyboardInterrupt()))
    assert cli.main(args + ["--overwrite"]) == 130
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    assert "Status: **interrupted**" in (out / "report.md").read_text()


@pytest.mark.parametrize("runner", ["full_batch", "minibatch"])
def test_training_placements_agree_on_a_conv_net(runner):
    # "auto" runs a conv net on CPU as one jitted call per step; it must train exactly as the one-scan loop.
    ds = data.subset(data.mnist1d(42), 32)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    model = models.CNN1D(channels=(4, 4), norm="bn")
    optimizer = optax.sgd(0.1)
    state = train.init_train_state(model, x[:2], optimizer, 0)
    step = train.make_train_step(model, "cross_entropy", optimizer)
    out = {}
    for placement in ("device", "host", "auto"):
        if runner == "full_batch":
            run = train.full_batch_runner(step, placement=placement)
        else:
            run = train.minibatch_runner(step, 8, placement=placement)
        out[placement] = run(state, x, y, 3)
    assert bnjax.loops.resolve_placement("auto", step, state, x, y) == "host"
    for placement in ("host", "auto"):
        for got, want in zip(jax.tree.leaves(out[placement]), jax.tree.leaves(out["device"])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert out["host"][1].loss.shape == (3,)
