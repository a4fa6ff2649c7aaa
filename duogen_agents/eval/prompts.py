"""The judge's prompts, all in one place (quoted in every report).

The judge answers under ``JUDGE_SCHEMA``: for each of DuoGen's axes (text quality, image fidelity,
image-context alignment) and the consistency of the answer's images, a score from 1 to 10 and a
short reason.
"""

from __future__ import annotations

from typing import Any

from duogen_agents.graphs.actions import text_schema

JUDGE_AXES = {
    "text": "text quality: is the text correct, clear and useful for the request?",
    "fidelity": "image fidelity: are the images well-formed, clear pictures (not noise or artefacts)?",
    "alignment": "image-context alignment: does each image show what the text around it says?",
    "consistency": "consistency: do people, objects and places stay the same across the answer's images?",
}

JUDGE_SYSTEM = (
    "You are a strict judge of illustrated answers (text interleaved with images). You are given the "
    "request and the answer; images appear in order. Score each axis from 1 (very poor) to 10 "
    "(excellent) and give a one-sentence reason."
)

JUDGE_REQUEST = "Request:\n{request}\n\nAnswer (text and images in order) follows."

JUDGE_AXES_PROMPT = "Score these axes:\n" + "\n".join(f"- {k}: {v}" for k, v in JUDGE_AXES.items())

REASON_CHARS = 160


def judge_schema() -> dict[str, Any]:
    axis = {
        "type": "object",
        "properties": {"score": {"enum": list(range(1, 11))}, "reason": text_schema(REASON_CHARS, multiline=False)},
        "required": ["score", "reason"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": dict.fromkeys(JUDGE_AXES, axis),
        "required": list(JUDGE_AXES),
        "additionalProperties": False,
    }
