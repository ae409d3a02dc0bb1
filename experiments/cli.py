"""Command line: ``python -m experiments <name> [--quick | --smoke] [--out DIR [--overwrite]] [--debug]
[--<field> VALUE ...]``.

Every field of the experiment's ``Config`` is an option (``--lrs 0.05,0.1`` or ``--lrs "(0.05, 0.1)"`` for
tuples, ``--steps 500``, ``--model none`` for an optional field); a preset is applied first, then the explicit
options. User errors are one line on stderr and exit status 2 (``--debug`` shows the traceback); see
:func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pathlib
import shlex
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from experiments import EXPERIMENTS, data, report

_SCALAR_FORMATS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
_LIST_FORMATS = {
    "int": ("integers", "32,32", "(32, 32)"),
    "float": ("numbers", "0.05,0.1", "(0.05, 0.1)"),
    "str": ("strings", "none,bn", "(none, bn)"),
    "bool": ("true/false values", "true,false", "(true, false)"),
}


def _parse_bool(s: str) -> bool:
    value = {"true": True, "1": True, "false": False, "0": False}.get(s.strip().lower())
    if value is None:
        raise ValueError(s)
    return value


def _parser_for(annotation: str) -> Callable[[str], Any]:
    """A string -> value parser for a field annotation (annotations are strings: ``from __future__``).

    Tuples accept ``0.05,0.1``, the form ``--help`` prints (``(32, 32)``, ``[32, 32]``, ``(32,)``) and ``""``
    or ``()`` for the empty tuple; optional fields accept ``none``. A bad value raises
    ``argparse.ArgumentTypeError`` saying what format was expected, which argparse reports with the option.
    """
    annotation = annotation.replace(" ", "")
    if annotation.endswith("|None"):
        inner = _parser_for(annotation[: -len("|None")])
        return lambda s: None if s.strip().lower() == "none" else inner(s)
    if annotation.startswith("tuple[") and annotation.endswith(",...]"):
        scalar = annotation[len("tuple[") : -len(",...]")]
        inner = _parser_for(scalar)

        def parse_tuple(s: str) -> tuple:
            body = s.strip()
            if len(body) >= 2 and body[0] + body[-1] in ("()", "[]"):
                body = body[1:-1]
            try:
                # Elements may be quoted, as --help prints string tuples: ('none', 'bn').
                return tuple(inner(part.strip().strip("'\"")) for part in body.split(",") if part.strip())
            except argparse.ArgumentTypeError:
                what, plain, shown = _LIST_FORMATS[scalar]
                raise argparse.ArgumentTypeError(
                    f"expected a comma-separated list of {what}, e.g. {plain} or {shown}, got {s!r}"
                ) from None

        return parse_tuple
    scalars: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _parse_bool}
    if annotation not in scalars:
        raise TypeError(f"Config fields must be int/float/str/bool, tuples of them or optional; got {annotation!r}.")
    convert = scalars[annotation]

    def parse_scalar(s: str) -> Any:
        try:
            return convert(s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_SCALAR_FORMATS[annotation]}, got {s!r}") from None

    return parse_scalar


class _Parser(argparse.ArgumentParser):
    """argparse, with a user error reported in one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _experiment_parser(name: str, module: types.ModuleType) -> argparse.ArgumentParser:
    config_cls = module.Config
    parser = _Parser(
        prog=f"python -m experiments {name}",
        description=config_cls.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    presets = parser.add_mutually_exclusive_group()
    for preset in module.PRESETS:
        presets.add_argument(f"--{preset}", action="store_true", help=f"use the {preset!r} preset")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<name>-<timestamp>/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    """Run an experiment into ``out``: ``config.json``, the experiment's plots, ``results.json``, ``report.md``.

    From the start the folder says the run is unfinished (status ``running``); an exception or Ctrl-C marks
    it ``failed`` (with the error) or ``interrupted`` before propagating, so no folder looks complete unless
    the run was.
    """
    title = f"{name}: {module.__doc__.strip().splitlines()[0]}"
    report.write_config(out, name, config, preset)
    report.write_status(out, title, command=command, status="running")
    start = time.perf_counter()
    try:
        outcome = module.run(config, out)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        message = None if status == "interrupted" else f"{type(err).__name__}: {err}"
        report.write_status(
            out, title, command=command, status=status, runtime_s=time.perf_counter() - start, error=message
        )
        raise
    runtime = time.perf_counter() - start
    report.write_json(out / "results.json", {**outcome.results, "runtime_s": runtime, "status": "complete"})
    report.write_report(
        out,
        title,
        outcome.claims,
        command=command,
        runtime_s=runtime,
        tables=outcome.tables,
        figures=outcome.figures,
        notes=outcome.notes,
        setting=outcome.setting,
        reading=outcome.reading,
        rule=outcome.rule,
    )
    return outcome


def _check_dataset(config: Any) -> None:
    """Load the configured data set once before anything is written, so a bad one is a clean user error."""
    if hasattr(config, "dataset"):
        try:
            data.load(config.dataset, getattr(config, "data_seed", 42))
        except (ValueError, OSError) as err:
            raise UserError(f"--dataset {config.dataset}: {err}") from err


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 done, 2 user error, 130 interrupted).

    User errors (a bad option or value, a bad data set, an unusable ``--out``, a configuration the experiment
    rejects with ``ValueError``) print one line and return 2; ``--debug`` shows their traceback instead.
    Other exceptions propagate with their traceback (after marking the run ``failed``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        top = _Parser(
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
    prog = f"python -m experiments {name}"
    out = None
    try:
        preset = next((p for p in module.PRESETS if getattr(args, p)), None)
        config = module.PRESETS[preset] if preset else module.Config()
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
        config = dataclasses.replace(config, **overrides)
        _check_dataset(config)
        try:
            out = report.run_dir(name, args.out, overwrite=args.overwrite)
        except report.OutputFolderError as err:
            raise UserError(str(err)) from err
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: the folder is not writable.")
        command = "python -m experiments " + " ".join(shlex.quote(a) for a in argv)
        try:
            execute(name, module, config, out, preset, command)
        except ValueError as err:  # the experiment rejected its configuration or data
            raise UserError(f"{err} (the run in {out} is marked failed)") from err
    except UserError as err:
        if args.debug:
            raise
        print(f"{prog}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = "" if out is None else f"; the run in {out} is marked interrupted"
        print(f"{prog}: interrupted{where}.", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}")
    return 0
