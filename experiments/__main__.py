"""``python -m experiments <name> [--quick] [--out DIR] [--field value ...]``; see ``--help``."""

from experiments.cli import main

raise SystemExit(main())
