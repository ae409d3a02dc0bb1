"""Command line: ``python -m experiments <name> [--quick | --smoke] [--out DIR] [--<field> VALUE ...]``.

Every field of the experiment's ``Config`` is an option (``--lrs 0.05,0.1`` for tuples, ``--steps 500``,
``--model none`` for an optional field); a preset is applied first, then the explicit options.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import shlex
import sys
import time
import types
from typing import Any, Callable, Sequence

from experiments import EXPERIMENTS, report


def _parser_for(annotation: str) -> Callable[[str], Any]:
    """A string -> value parser for a field annotation (annotations are strings: ``from __future__``)."""
    annotation = annotation.replace(" ", "")
    if annotation.endswith("|None"):
        inner = _parser_for(annotation[: -len("|None")])
        return lambda s: None if s.lower() == "none" else inner(s)
    if annotation.startswith("tuple[") and annotation.endswith(",...]"):
        inner = _parser_for(annotation[len("tuple[") : -len(",...]")])
        return lambda s: tuple(inner(part) for part in s.split(",") if part)
    scalars: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "str": str,
        "bool": lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()],
    }
    if annotation not in scalars:
        raise TypeError(f"Config fields must be int/float/str/bool, tuples of them or optional; got {annotation!r}.")
    return scalars[annotation]


def _experiment_parser(name: str, module: types.ModuleType) -> argparse.ArgumentParser:
    config_cls = module.Config
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments {name}",
        description=config_cls.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    presets = parser.add_mutually_exclusive_group()
    for preset in module.PRESETS:
        presets.add_argument(f"--{preset}", action="store_true", help=f"use the {preset!r} preset")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<name>-<timestamp>/)")
    defaults = config_cls()
    for field in dataclasses.fields(config_cls):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=_parser_for(field.type),
            default=argparse.SUPPRESS,
            help=f"{field.type} (default {getattr(defaults, field.name)!r})",
        )
    return parser


def execute(
    name: str, module: types.ModuleType, config: Any, out: pathlib.Path, preset: str | None, command: str
) -> report.Outcome:
    """Run an experiment into ``out``: ``config.json``, the experiment's plots, ``results.json``, ``report.md``."""
    report.write_config(out, name, config, preset)
    start = time.perf_counter()
    outcome = module.run(config, out)
    runtime = time.perf_counter() - start
    report.write_json(out / "results.json", {**outcome.results, "runtime_s": runtime})
    report.write_report(
        out,
        f"{name}: {module.__doc__.strip().splitlines()[0]}",
        outcome.claims,
        command=command,
        runtime_s=runtime,
        tables=outcome.tables,
        figures=outcome.figures,
        notes=outcome.notes,
    )
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        top = argparse.ArgumentParser(
            prog="python -m experiments",
            description="Experiments that test the batchnorm literature's claims with bnjax.",
            epilog="\n".join(f"  {n:<16} {summary}" for n, (_, summary) in EXPERIMENTS.items())
            + "\n\nRun `python -m experiments <name> --help` for an experiment's options.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        top.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment to run")
        top.parse_args(argv)  # prints help or a clear error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(EXPERIMENTS[name][0])
    args = _experiment_parser(name, module).parse_args(argv[1:])
    preset = next((p for p in module.PRESETS if getattr(args, p)), None)
    config = module.PRESETS[preset] if preset else module.Config()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    config = dataclasses.replace(config, **overrides)
    out = report.run_dir(name, args.out)
    command = "python -m experiments " + " ".join(shlex.quote(a) for a in argv)
    execute(name, module, config, out, preset, command)
    print(f"report: {out / 'report.md'}")
    return 0
