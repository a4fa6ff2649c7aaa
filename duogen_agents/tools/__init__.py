"""Graph-facing and LangChain-facing image tools."""

from duogen_agents.tools.render import RenderImageArgs, Renderer

__all__ = ["RenderImageArgs", "Renderer"]
