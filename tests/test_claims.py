"""The claims matrix (experiments.claims): its entries come from every experiment's MATRIX and are valid
Configs; cells and rows combine verdicts by the stated rule; the quick form never refutes."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from experiments import EXPERIMENTS, claims, models, report


def _modules():
    return {n: importlib.import_module(m) for n, (m, _) in EXPERIMENTS.items() if n != "claims"}


@pytest.mark.parametrize("form", ["quick", "full", "smoke"])
def test_every_entry_is_a_valid_config_of_its_experiment(form):
    modules = _modules()
    found = claims.entries(claims.Config(form=form))
    assert {e.experiment for e in found} == {n for n, m in modules.items() if getattr(m, "MATRIX", None)}
    for entry in found:
        config_cls = modules[entry.experiment].Config
        config = dataclasses.replace(config_cls(), **entry.overrides)  # unknown fields raise TypeError
        if entry.family in models.FAMILIES and hasattr(config, "model"):
            assert config.model == entry.family, entry
        if entry.family == "vgg":
            assert config.dataset == "digits", entry  # the VGG-style net takes images
        if form != "smoke" and hasattr(config, "seeds"):
            assert len(config.seeds) >= 3, entry  # every claim of the matrix is judged over >= 3 seeds


def test_only_selects_entries_and_rejects_unknown_names():
    every = claims.entries(claims.Config(form="quick"))
    first = every[0]
    picked = claims.entries(claims.Config(form="quick", only=(f"{first.experiment}/{first.family}",)))
    assert [(e.experiment, e.family) for e in picked] == [(first.experiment, first.family)]
    with pytest.raises(ValueError, match="only names no matrix entry"):
        claims.entries(claims.Config(form="quick", only=("no_such_experiment",)))
    with pytest.raises(ValueError, match="form must be one of"):
        claims.entries(claims.Config(form="long"))


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        (["held", "held"], "held"),
        (["not held", "not held"], "not held"),
        (["held", "not held"], "inconclusive"),
        (["held", "inconclusive"], "inconclusive"),
        (["too short to judge"], "too short to judge"),
        ([], "inconclusive"),
    ],
)
def test_row_verdict_follows_the_rule(verdicts, expected):
    assert claims.row_verdict(verdicts) == expected


def test_the_quick_form_confirms_but_never_refutes():
    for verdict in ("not held", "inconclusive"):
        assert claims._cell_verdict(verdict, "quick") == "too short to judge"
        assert claims._cell_verdict(verdict, "full") == verdict
    assert claims._cell_verdict("held", "quick") == "held"


def test_the_matrix_puts_each_claim_in_its_family_column_with_effect_and_link():
    def cell(family, verdict, effect):
        return {
            "experiment": "smoothness",
            "family": family,
            "folder": f"smoothness-{family}",
            "runtime_s": 1.0,
            "claims": [{"claim": "BN smooths", "measured": "m", "effect": effect, "verdict": verdict}],
        }

    failed = {"experiment": "smoothness", "family": "vgg", "folder": "smoothness-vgg", "runtime_s": 2.0}
    cells = [cell("cnn1d", "held", "0.2x [0.1, 0.3]"), cell("mlp", "not held", "1.5x [1.2, 1.9]")]
    cells.append({**failed, "claims": [], "error": "RuntimeError: boom"})
    outcome = claims._outcome(claims.Config(form="full"), cells)
    matrix = outcome.tables[0]
    header = matrix.splitlines()[0]
    assert header == "| experiment | claim | mlp | cnn1d | vgg |"  # columns in FAMILIES order
    row = matrix.splitlines()[2]
    assert "**not held** 1.5x [1.2, 1.9] ([run](smoothness-mlp/report.md))" in row
    assert "**held** 0.2x [0.1, 0.3] ([run](smoothness-cnn1d/report.md))" in row
    assert row.endswith("| error |")
    (claim,) = outcome.claims
    assert claim.verdict == "inconclusive" and claim.measured == "not held on mlp; held on cnn1d"
    assert any("RuntimeError: boom" in n for n in outcome.notes)
    assert all(c.verdict in report.VERDICTS for c in outcome.claims)


def test_resume_reuses_a_finished_entry_of_the_same_config_and_reruns_a_changed_one(tmp_path, monkeypatch):
    from experiments import cli

    calls = []

    def fake_execute(name, module, config, out, preset, command):
        calls.append(config)
        report.write_json(out / "results.json", {"status": "complete"})
        return report.Outcome({}, [report.Claim("BN smooths", "m", "held", "0.5x [0.4, 0.6]")], [], [], [])

    monkeypatch.setattr(cli, "execute", fake_execute)
    smoke = claims.Config(form="smoke", only=("smoothness/mlp",))
    first = claims.run(smoke, tmp_path)
    assert len(calls) == 1 and (tmp_path / "smoothness-mlp" / "cell.json").exists()
    again = claims.run(dataclasses.replace(smoke, resume=True), tmp_path)
    assert len(calls) == 1  # reused, not rerun
    assert again.results["cells"][0]["claims"] == first.results["cells"][0]["claims"]
    claims.run(smoke, tmp_path)  # without resume every entry runs
    assert len(calls) == 2
    # A changed config (here: the quick form's overrides) does not match the saved run: it is rerun.
    claims.run(claims.Config(form="quick", only=("smoothness/mlp",), resume=True), tmp_path)
    assert len(calls) == 3 and calls[-1] != calls[0]
