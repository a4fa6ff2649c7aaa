"""Graph-facing and LangChain-facing image tools."""

from duogen_agents.tools.render import Renderer, RenderImageArgs

__all__ = ["RenderImageArgs", "Renderer"]
