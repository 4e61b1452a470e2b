"""hug_lightning: a PyTorch Lightning template for the HUG loss and neural-collapse metrics.

Main entry points: :class:`hug_lightning.module.ClassifierModule`, the heads in
:mod:`hug_lightning.heads`, the DataModules in :mod:`hug_lightning.data` and the command
``hug-lightning`` (:func:`hug_lightning.cli.main`).
"""

__version__ = "0.1.0"
