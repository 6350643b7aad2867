"""``python -m experiments.study``: see :mod:`experiments.study`."""

from experiments.study.cli import main

raise SystemExit(main())
