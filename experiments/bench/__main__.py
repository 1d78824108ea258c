"""``python -m experiments.bench``: see :mod:`experiments.bench`."""

import sys

from experiments.bench.cli import main

sys.exit(main())
