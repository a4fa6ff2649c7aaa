"""Serving: ``duogen serve`` (an HTTP app with the OpenAI-compatible model surface, the agent and its
sessions) and ``duogen mcp`` (an MCP server with the agent's tools). Needs ``pip install
'duogen-agents[serve]'``."""
