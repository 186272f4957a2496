"""``python -m genkernels.models.train MODEL [options]``: see :mod:`genkernels.models.train.cli`."""
import sys

from .cli import main

sys.exit(main())
