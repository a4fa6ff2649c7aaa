"""What the turn graph's nodes call, handed to each node by ``build_graph``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from duogen_agents.presets import Limits, PlannerSpec
    from duogen_agents.storage.images import ImageStore
    from duogen_agents.tools.render import Renderer


@dataclass
class GraphDeps:
    """The planner (as a LangChain chat model), the renderer, the image store and the limits.

    ``critic`` is the chat model that checks images (a separate model named in the preset, as
    InterleaveThinker's critic); ``None`` means the planner checks its own images."""

    chat: Any  # ChatDuogen over the preset's planner
    renderer: Renderer
    store: ImageStore
    planner_spec: PlannerSpec
    limits: Limits
    critic: Any = None  # ChatDuogen | None
    allow_remote_images: bool = False  # fetch http(s) image URLs found in incoming messages
    # Callers on another machine (a LangGraph server's clients): a file:// image URL is refused (it
    # would read this machine's files), and events name no path on this machine.
    remote_callers: bool = False
    # Per (session, kind of call) longer than the model's context: how many of its oldest turns the last
    # such call left out, and how many messages the history had then.
    dropped_turns: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def checker(self) -> Any:
        return self.critic if self.critic is not None else self.chat
