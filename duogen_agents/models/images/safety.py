"""A safety checker that passes everything, for random-weight models and users who opt out explicitly.

Diffusers' Cosmos pipelines build NVIDIA's guardrail (``cosmos_guardrail``) unless given a checker;
``image.safety_checker = "none"`` in a preset passes this one, under the NVIDIA Open Model License's terms.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """Accepts every prompt and frame. For random-weight tests and for users who opt out explicitly."""

    @register_to_config
    def __init__(self) -> None:
        super().__init__()
        # One parameter so that ``.to(device)`` and dtype queries work like on the real checker.
        self._probe = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: Any) -> Any:
        return frames
