"""The turn graph's nodes: module-level functions ``node(state, [config,] *, deps)``.

``build_graph`` binds ``deps`` with ``functools.partial``; a test calls a node directly with a
state dict and a ``GraphDeps`` of its choosing.
"""

from duogen_agents.graphs.nodes.check import check, revise
from duogen_agents.graphs.nodes.finish import finish
from duogen_agents.graphs.nodes.plan import outline, plan, start
from duogen_agents.graphs.nodes.render import accept, render

__all__ = ["accept", "check", "finish", "outline", "plan", "render", "revise", "start"]
