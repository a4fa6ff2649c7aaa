"""Storage layer: the database (records and checkpoints), the content-addressed image store, locks."""

from duogen_agents.storage.images import ImageStore, default_home

__all__ = ["ImageStore", "default_home"]
