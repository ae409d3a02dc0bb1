"""The claims matrix: every claim of every experiment on each architecture family it applies to.

Each experiment module names the families it applies to and the settings of the matrix's forms in its
``MATRIX`` (``{family: {"quick": overrides, "full": overrides}}``, applied to that experiment's ``Config()``).
This module runs each (experiment, family) entry into its own sub-folder with that experiment's own report,
then writes one report: a matrix of claims x families with the measured effect, its interval and the verdict,
and a link to the run that measured it. Where each batchnorm claim holds and where it does not is the table
no single paper gives.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import textwrap
import time
import traceback
from typing import Any

import matplotlib.pyplot as plt

from experiments import EXPERIMENTS, models, report

FORMS = ("full", "quick", "smoke")
# Matrix columns in this order; a family an experiment defines beyond these (e.g. "linear") follows them.
COLUMNS = (*models.FAMILIES, "linear", "deep_linear")


@dataclasses.dataclass(frozen=True)
class Config:
    """The claims matrix over every experiment that defines ``MATRIX`` and every family it lists.

    Command: ``python -m experiments claims`` (full) or ``--quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    ``form``: ``full`` runs each entry's ``"full"`` overrides, ``quick`` its ``"quick"`` ones, ``smoke`` the
    experiment's smoke preset with the entry's ``model`` and ``dataset`` (seconds; for tests). ``only``
    restricts the matrix to entries named ``experiment`` or ``experiment/family`` (e.g.
    ``--only smoothness/cnn1d,eos``). ``resume``: an entry whose folder already holds a finished run of exactly
    this entry's config (its ``cell.json``, written when the entry finishes) is read back instead of rerun, so
    an interrupted matrix continues where it stopped: rerun the same command with ``--resume true`` and
    ``--overwrite`` (the matrix's own report is rewritten, the finished entries' folders are kept).
    Verdicts: each cell is the experiment's own verdict on that family, by the rule its report prints. In the
    quick form a cell that did not hold reads "too short to judge": the quick runs are shorter than the
    full ones and may confirm a claim but not refute it (the quick form of ``eos`` applies the same rule).
    A row's verdict: held when held on every family run, not held when not held on every one, inconclusive
    otherwise (the cells say where it holds).
    """

    form: str = "full"
    only: tuple[str, ...] = ()
    resume: bool = False


PRESETS = {
    "quick": Config(form="quick"),
    "smoke": Config(form="smoke", only=("smoothness/mlp",)),
}
CHOICES = {"form": FORMS}

ROW_RULE = (
    "each cell is the experiment's own verdict on that family (its report states the rule); "
    "a row is held when held on every family it ran on, not held when not held on every one, "
    "inconclusive otherwise; in the quick form a cell that did not hold reads 'too short to judge'"
)


@dataclasses.dataclass(frozen=True)
class MatrixEntry:
    """One cell column of the matrix: an experiment on one family, with the Config overrides it runs with."""

    experiment: str
    family: str
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.experiment}-{self.family}"


def entries(config: Config) -> list[MatrixEntry]:
    """The (experiment, family) entries of ``config``'s form, in EXPERIMENTS order then COLUMNS order.

    Raises:
      ValueError: for an unknown form, or an ``only`` item that names no entry.
    """
    if config.form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {config.form!r}.")
    found = []
    for name, (module_name, _) in EXPERIMENTS.items():
        if name == "claims":
            continue
        module = importlib.import_module(module_name)
        matrix = getattr(module, "MATRIX", {})
        for family in sorted(matrix, key=_column_order):
            forms = matrix[family]
            if config.form == "smoke":
                keep = {k: v for k, v in forms["quick"].items() if k in ("model", "dataset")}
                overrides = {**dataclasses.asdict(module.PRESETS["smoke"]), **keep}
            else:
                overrides = dict(forms[config.form])
            found.append(MatrixEntry(name, family, overrides))
    if config.only:
        unknown = [o for o in config.only if not any(o in (e.experiment, f"{e.experiment}/{e.family}") for e in found)]
        if unknown:
            names = ", ".join(f"{e.experiment}/{e.family}" for e in found)
            raise ValueError(f"only names no matrix entry: {unknown}; the entries are {names}.")
        found = [e for e in found if e.experiment in config.only or f"{e.experiment}/{e.family}" in config.only]
    return found


def _column_order(family: str) -> tuple[int, str]:
    return (COLUMNS.index(family) if family in COLUMNS else len(COLUMNS), family)


_COLOURS = {"held": "#7fbf7f", "not held": "#e08080", "inconclusive": "#f0d080", "too short to judge": "#c8c8c8"}


def _figure(rows: dict, families: list[str], out: pathlib.Path) -> str:
    """The matrix as a grid: one row per claim, one column per family, coloured by verdict, effect written in."""
    fig, axes = report.figure(size=(2.6 * len(families) + 5.0, 0.75 * len(rows) + 1.2))
    ax = axes[0]
    for r, by_family in enumerate(rows.values()):
        for c, family in enumerate(families):
            cell = by_family.get(family)
            colour = _COLOURS.get(cell["verdict"], "white") if cell else "white"
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=colour, edgecolor="white"))
            label = "–" if cell is None else cell["verdict"] + "\n" + (cell["effect"] or "").replace("; ", "\n")
            ax.text(c + 0.5, r + 0.5, label, ha="center", va="center", fontsize=6.5)
    ax.set(xlim=(0, len(families)), ylim=(len(rows), 0))
    ax.set_xticks([c + 0.5 for c in range(len(families))], families)
    names = [textwrap.fill(f"{e}: {t}", 48) for e, t in rows]
    ax.set_yticks([r + 0.5 for r in range(len(rows))], names, fontsize=7)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=col) for col in _COLOURS.values()]
    ax.legend(handles, list(_COLOURS), loc="upper left", bbox_to_anchor=(0, 0), ncols=4, fontsize=7, frameon=False)
    return report.save_figure(fig, out, "claims_matrix.png")


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Run every entry into ``out/<experiment>-<family>/`` and write the matrix."""
    from experiments import cli  # cli imports the experiments registry; import here to avoid a cycle

    todo = entries(config)
    cells: list[dict[str, Any]] = []
    for i, entry in enumerate(todo):
        module = importlib.import_module(EXPERIMENTS[entry.experiment][0])
        sub_config = dataclasses.replace(module.Config(), **entry.overrides)
        sub = out / entry.name
        sub.mkdir(parents=True, exist_ok=True)
        command = f"python -m experiments claims (form {config.form}), entry {entry.experiment}/{entry.family}"
        entry_config = json.loads(json.dumps(dataclasses.asdict(sub_config)))
        done = _finished_cell(sub, entry_config) if config.resume else None
        if done is not None:
            print(f"[claims {i + 1}/{len(todo)}] {entry.experiment} on {entry.family}: finished run reused", flush=True)
            cells.append(done)
            continue
        print(f"[claims {i + 1}/{len(todo)}] {entry.experiment} on {entry.family}", flush=True)
        start = time.perf_counter()
        try:
            outcome = cli.execute(entry.experiment, module, sub_config, sub, None, command)
        except Exception as err:  # one entry's failure is reported in its cell, the matrix goes on
            cells.append(
                {
                    **_cell_key(entry),
                    "runtime_s": time.perf_counter() - start,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(limit=5),
                    "claims": [],
                }
            )
            continue
        claims = [
            {
                "claim": c.claim,
                "measured": c.measured,
                "effect": c.effect,
                "verdict": _cell_verdict(c.verdict, config.form),
                "run_verdict": c.verdict,
            }
            for c in outcome.claims
        ]
        cell = {**_cell_key(entry), "runtime_s": time.perf_counter() - start, "claims": claims}
        report.write_json(sub / "cell.json", {"config": entry_config, "cell": cell})
        cells.append(cell)
    return _outcome(config, cells, out)


def _finished_cell(folder: pathlib.Path, entry_config: dict[str, Any]) -> dict[str, Any] | None:
    """The cell of a finished run of ``entry_config`` in ``folder`` (its ``cell.json``), else None."""
    try:
        saved = json.loads((folder / "cell.json").read_text())
        status = json.loads((folder / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        return None
    if status != "complete" or saved.get("config") != entry_config:
        return None
    return saved["cell"]


def _cell_key(entry: MatrixEntry) -> dict[str, Any]:
    return {"experiment": entry.experiment, "family": entry.family, "folder": entry.name}


def _cell_verdict(verdict: str, form: str) -> str:
    """A cell's verdict in the matrix: the quick form only confirms (see :class:`Config`)."""
    if form != "full" and verdict in ("not held", "inconclusive"):
        return "too short to judge"
    return verdict


def row_verdict(verdicts: list[str]) -> str:
    """Combine a claim's cell verdicts over families by :data:`ROW_RULE`."""
    if not verdicts:
        return "inconclusive"
    if all(v == "held" for v in verdicts):
        return "held"
    if all(v == "not held" for v in verdicts):
        return "not held"
    if all(v == "too short to judge" for v in verdicts):
        return "too short to judge"
    return "inconclusive"


def _outcome(config: Config, cells: list[dict[str, Any]], out: pathlib.Path | None = None) -> report.Outcome:
    families = sorted({c["family"] for c in cells}, key=_column_order)
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for cell in cells:
        for claim in cell["claims"]:
            rows.setdefault((cell["experiment"], claim["claim"]), {})[cell["family"]] = {**claim, **cell}
    table_rows, claims = [], []
    for (experiment, text), by_family in rows.items():
        line = [experiment, text]
        for family in families:
            c = by_family.get(family)
            if c is None:
                ran = any(x["experiment"] == experiment and x["family"] == family for x in cells)
                line.append("error" if ran else "–")
                continue
            effect = c["effect"] or c["measured"]
            line.append(f"**{c['verdict']}** {effect} ([run]({c['folder']}/report.md))")
        table_rows.append(line)
        verdicts = [by_family[f]["verdict"] for f in families if f in by_family]
        where = {
            v: [f for f in families if f in by_family and by_family[f]["verdict"] == v] for v in dict.fromkeys(verdicts)
        }
        measured = "; ".join(f"{v} on {', '.join(fs)}" for v, fs in where.items())
        claims.append(report.Claim(f"{experiment}: {text}", measured, row_verdict(verdicts)))
    matrix = report.markdown_table(["experiment", "claim", *families], table_rows)
    run_rows = [
        [
            c["experiment"],
            c["family"],
            f"[{c['folder']}]({c['folder']}/report.md)",
            f"{c['runtime_s']:.0f}",
            c.get("error", "complete"),
        ]
        for c in cells
    ]
    runs_table = report.markdown_table(["experiment", "family", "report", "runtime (s)", "status"], run_rows)
    total = sum(c["runtime_s"] for c in cells)
    counts = {v: sum(c.verdict == v for c in claims) for v in report.VERDICTS}
    errors = [c for c in cells if "error" in c]
    reading = (
        f"Each row is one claim of the batchnorm literature as an experiment of this package tests it; each "
        f"column one architecture family (MLP, 1-D CNN on MNIST-1D, VGG-style CNN on 8x8 digits, or the "
        f"experiment's own model). A cell gives the verdict on that family over the experiment's seeds, the "
        f"measured effect (BN against no normalization unless the claim says otherwise) with its 95% interval, "
        f"and a link to the run's own report, whose setting table says exactly what was trained. Of the "
        f"{len(claims)} claims, {counts['held']} held on every family they ran on, {counts['not held']} held on "
        f"none, {counts['inconclusive']} held on some families and not on others or could not be decided, and "
        f"{counts['too short to judge']} were too short to judge."
        + (
            " Quick form: the runs are shorter than the full form's, so a cell that did not hold reads 'too "
            "short to judge' (a short run can confirm a claim, not refute it)."
            if config.form != "full"
            else ""
        )
    )
    setting = (
        ("form", config.form),
        ("entries", f"{len(cells)} (experiment x family)"),
        ("families", ", ".join(families)),
        ("total runtime", f"{total / 60:.1f} min (sum of the entries)"),
    )
    notes = [
        "Each entry ran with the overrides in its experiment's `MATRIX` (see results.json `cells` and each run's "
        "config.json); the rest is that experiment's default Config.",
    ]
    if errors:
        notes.append(f"{len(errors)} entries failed: " + "; ".join(f"{c['folder']}: {c['error']}" for c in errors))
    results = {"form": config.form, "cells": cells, "runtime_entries_s": total}
    figures = [_figure(rows, families, out)] if out is not None and rows else []
    tables = [matrix, "### Runs\n\n" + runs_table]
    return report.Outcome(results, claims, tables, figures, notes, setting, reading, ROW_RULE)
