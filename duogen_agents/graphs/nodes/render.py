"""``render`` draws the pending request; ``accept`` puts an image into the answer."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig

from duogen_agents.document import ImageBlock, ImageRef
from duogen_agents.graphs.deps import GraphDeps
from duogen_agents.graphs.nodes.common import known_refs, writer
from duogen_agents.graphs.state import PendingImage, TurnState
from duogen_agents.tools.render import Renderer

# Spreads the image seeds of a turn apart: per turn seed, per image, per attempt.
TURN_SEED_STRIDE = 1_000_003
IMAGE_SEED_STRIDE = 101


def render(state: TurnState, config: RunnableConfig, *, deps: GraphDeps) -> dict[str, Any]:
    pending = state["pending"]
    assert pending is not None
    write = writer()
    seed = state.get("seed", 0) * TURN_SEED_STRIDE + state.get("images", 0) * IMAGE_SEED_STRIDE + pending["attempt"]
    index = state.get("images", 0) + 1
    write(
        {
            "event": "image_start",
            "index": index,
            "prompt": pending["prompt"],
            "kind": pending["kind"],
            "origin": pending["origin"],
            "attempt": pending["attempt"],
            "references": pending["references"],
        }
    )

    def on_step(step: int, total: int) -> None:
        write({"event": "image_progress", "index": index, "step": step, "total": total})

    refs = Renderer.resolve(pending["references"], known_refs(state))
    session = (config.get("configurable") or {}).get("thread_id")
    result = deps.renderer.render(
        pending["prompt"], refs, kind=pending["kind"], seed=seed, on_step=on_step, session=session
    )
    pending = {**pending, "seed": seed, "drawn": result.record()}  # type: ignore[typeddict-unknown-key]
    if deps.limits.check:
        return {"candidate": result.ref.model_dump(), "pending": pending}
    return accept(state, pending, result.ref, deps=deps)


def accept(state: TurnState, pending: PendingImage, ref: ImageRef, *, deps: GraphDeps) -> dict[str, Any]:
    """The image joins the answer (a block), the conversation (a message) and the known images."""
    drawn = pending.get("drawn") or {}  # type: ignore[typeddict-item]
    block = ImageBlock(
        image=ref,
        prompt=pending["prompt"],
        kind=pending["kind"],
        references=pending["references"],
        origin=pending["origin"],
        step=pending["step"],
        seed=pending["seed"],
        attempts=pending["attempt"],
        rejected=[
            {"image": r["image"], "prompt": r["prompt"], "note": r["note"]} for r in pending.get("rejections") or []
        ],
        **drawn,
    )
    writer()(
        {
            "event": "image_ready",
            "index": state.get("images", 0) + 1,
            "image": ref.model_dump(),
            **({} if deps.remote_callers else {"path": str(deps.store.path(ref.id))}),
            "prompt": pending["prompt"],
            "kind": pending["kind"],
            "origin": pending["origin"],
            "step": pending["step"],
        }
    )
    note = "Draft sketch" if pending["origin"] == "draft" else "Image"
    message = AIMessage(
        content=[
            {"type": "text", "text": f"{note}: {pending['prompt']}"},
            {"type": "image", "file_id": ref.id, "mime_type": ref.mime},
        ]
    )
    return {
        "blocks": [block.model_dump()],
        "messages": [message],
        "known_images": {ref.short: ref.model_dump()},
        "images": state.get("images", 0) + 1,
        "pending": None,
        "candidate": None,
    }
