"""``finish`` closes the turn and says why it stopped."""

from __future__ import annotations

from typing import Any

from duogen_agents.graphs.nodes.common import writer
from duogen_agents.graphs.state import TurnState


def finish(state: TurnState) -> dict[str, Any]:
    blocks = state.get("blocks") or []
    writer()({"event": "finish", "stop_reason": state.get("stop_reason"), "blocks": len(blocks)})
    return {"finished": True}
