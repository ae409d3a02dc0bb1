"""``python -m experiments <name> [--quick] [--out DIR] [--field value ...]``; see ``--help``."""

import signal

from experiments.cli import main


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM (a scheduler's or `timeout`'s kill) marks the run interrupted, as Ctrl-C


signal.signal(signal.SIGTERM, _interrupt)
raise SystemExit(main())
