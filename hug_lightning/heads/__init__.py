"""Classification heads: the contract, cross-entropy and HUG."""

from hug_lightning.heads.base import Head, HeadCallable, HeadOutput
from hug_lightning.heads.ce import CrossEntropyHead
from hug_lightning.heads.hug import HUGHead

__all__ = ["CrossEntropyHead", "Head", "HeadCallable", "HeadOutput"]
__all__ += ["HUGHead"]
