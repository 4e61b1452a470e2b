"""``python -m hug_lightning``: the same command as ``hug-lightning``."""

import sys

from hug_lightning.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
