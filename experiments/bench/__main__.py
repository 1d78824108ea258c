"""``python -m experiments.bench``: see :mod:`experiments.bench`."""

import sys

from experiments.bench.run import main

sys.exit(main())
