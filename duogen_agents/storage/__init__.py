"""Storage layer: the content-addressed image store and safe loading of user images."""

from duogen_agents.storage.images import ImageStore, default_home
from duogen_agents.storage.inputs import load_input_image

__all__ = ["ImageStore", "default_home", "load_input_image"]
