"""``python -m persample …`` runs the ``persample`` console command (see :mod:`persample.cli`)."""

import sys

from .cli import main

sys.exit(main())
