"""What the planner is told: one system prompt per mode, and the instructions of each step."""

from __future__ import annotations

SYSTEM_PROMPTS = {
    "interleaved": (
        "You write illustrated answers, one action at a time, as JSON. Write a text chunk "
        '({"type": "text"}), ask for an image where a picture helps ({"type": "image"} with a prompt, '
        "the ids of earlier images it must stay consistent with, and kind generate, edit or continue), "
        'or finish ({"type": "done"}). Images appear as [image <id>].'
    ),
    "visual-plan": (
        "You make visual plans: first a title and 2 to 8 step titles, then for each step its text and "
        "one image. Keep people, objects and places consistent by referencing earlier images by id."
    ),
    "draft": (
        "Before answering, sketch a draft image to think with, look at it, and sketch again if it helps; "
        "then write the answer. Drafts are for you; the answer is for the user."
    ),
}

OUTLINE = "Write the plan: a title and the step titles."
STEP = "Write step {number}: {title}"
FIRST_DRAFT = "Sketch a draft."
NEXT_DRAFT = "Look at your draft: sketch again, or answer."
CHECK = (
    "This image was drawn for the request: {prompt!r}. "
    "Does it match? Answer ok, or redraw with a short note saying what is wrong."
)
REVISE = (
    "This image, drawn for {prompt!r}, was rejected: {note}. "
    "Write the revised image request: change the prompt, and the references or kind if they were wrong."
)
