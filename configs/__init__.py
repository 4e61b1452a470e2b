"""YAML configs shipped with hug_lightning (installed as the package ``hug_lightning.configs``)."""
