"""``python -m hug_lightning.experiments``: the grid runner (:mod:`hug_lightning.experiments`)."""

import sys

from hug_lightning.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
