"""``python -m flatjax ...`` runs the command line (see :mod:`flatjax.cli`)."""

import sys

from flatjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
