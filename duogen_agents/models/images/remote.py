"""The image tool behind an OpenAI Images endpoint (vLLM-Omni, SGLang Diffusion, ``duogen serve``).

===================================  ==============================================================
request                              call
===================================  ==============================================================
``generate``, no references          ``POST /v1/images/generations`` (JSON)
``generate`` / ``edit`` with refs    ``POST /v1/images/edits`` (multipart, one ``image[]`` per reference)
``continue``                         refused, unless ``image.kinds`` lists it (then ``/v1/images/edits``)
===================================  ==============================================================

Every call asks for ``response_format = "b64_json"`` at ``size = "{width}x{height}"`` of the spec, and
sends the request's ``seed`` (vLLM-Omni and SGLang Diffusion take it); engine settings such as
``num_inference_steps`` or ``guidance_scale`` go in ``image.extra_body``. References are letterboxed
to the canvas (never cropped) and sent as PNG, oldest first. A server is one step to us: ``on_step``
hears ``(1, 1)`` when the image is back. The answer is untrusted input: over ``inputs.MAX_PIXELS`` it is
refused before decoding, and one of another size than asked is letterboxed to the canvas (the size
the server sent is in the drawing's details).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError

from duogen_agents.errors import GenerationError
from duogen_agents.inputs import MAX_PIXELS
from duogen_agents.models.protocols import Drawing, ImageKind, StepCallback, letterbox, refusal
from duogen_agents.models.remote import (
    Malformed,
    _is_transport_error,
    deadline,
    describe_error,
    make_client,
    parsed,
    redact,
    served_model,
)
from duogen_agents.presets import ImageSpec

FAMILY = "openai-images"


class OpenAIImagesTool:
    """An ``ImageTool`` over ``/v1/images/generations`` and ``/v1/images/edits``. Build it with
    ``from_spec``. Keeps no state between calls: one instance serves many threads."""

    def __init__(self, client: Any, spec: ImageSpec, url: str, model: str | None) -> None:
        self.client = client
        self.spec = spec
        self.url = url
        self.model = model
        self.capabilities: Mapping[str, int] = {kind: spec.max_references for kind in spec.kinds}

    @classmethod
    def from_spec(cls, spec: ImageSpec) -> OpenAIImagesTool:
        client, url = make_client(spec, "image")
        return cls(client, spec, url, spec.model or served_model(client, url, "image", spec))

    def draw(
        self,
        prompt: str,
        *,
        kind: ImageKind = "generate",
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> Drawing:
        import openai

        if problem := refusal(self.capabilities, kind, len(references)):
            raise GenerationError(problem)
        spec = self.spec
        canvas = (spec.width, spec.height)
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "n": 1,
            "size": f"{spec.width}x{spec.height}",
            "response_format": "b64_json",
            "extra_body": {"seed": seed, **(spec.extra_body or {})},
        }
        if self.model:
            kwargs["model"] = self.model
        endpoint = "edits" if references else "generations"
        where = f"{self.url}/images/{endpoint}"
        if references:
            # ``kind`` says what the references are for; duogen serve reads it, other servers ignore it.
            kwargs["extra_body"] = {"kind": kind, **kwargs["extra_body"]}
            kwargs["image"] = [
                (f"reference-{i}.png", _png(letterbox(im, canvas)), "image/png") for i, im in enumerate(references)
            ]
        with deadline(spec) as call:
            try:
                images = self.client.images.with_raw_response
                raw = images.edit(**kwargs) if references else images.generate(**kwargs)
                response = parsed(raw)
            except (openai.APIError, OSError) as e:
                raise GenerationError(describe_error(e, "image server", where, spec, call)) from None
            except Malformed as e:
                raise GenerationError(redact(f"the image server at {where} sent a malformed response: {e}")) from None
            except Exception as e:
                if _is_transport_error(e):
                    raise GenerationError(describe_error(e, "image server", where, spec, call)) from None
                raise
        image = self._decode(response, endpoint)
        details: dict[str, Any] = {"endpoint": f"/images/{endpoint}", "references": len(references), "kind": kind}
        if image.size != canvas:  # a server that snaps sizes: fitted to the canvas, never cropped
            details["served_size"] = list(image.size)
            image = letterbox(image, canvas)
        if on_step is not None:
            on_step(1, 1)
        return Drawing(image, family=FAMILY, pipeline=self.model or "served model", frames=0, details=details)

    def _decode(self, response: Any, endpoint: str) -> Image.Image:
        where = f"the image server at {self.url}/images/{endpoint}"
        data = getattr(response, "data", None) or []
        b64 = getattr(data[0], "b64_json", None) if data else None
        if not b64:
            raise GenerationError(f"{where} sent no b64_json image (does it support response_format = b64_json?)")
        try:
            # The server's answer is untrusted input, like an upload: its size is read from the header
            # and held to MAX_PIXELS before anything is decoded (Pillow's own bomb warning is an error).
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
                if image.width * image.height > MAX_PIXELS:
                    raise GenerationError(
                        f"{where} sent a {image.width}x{image.height} image, more than duogen accepts (the limit is "
                        f"{MAX_PIXELS:,} pixels; it asked for {self.spec.width}x{self.spec.height})"
                    )
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise GenerationError(f"{where} sent an image too large to decode safely: {e}") from None
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
            raise GenerationError(f"{where} sent an image that cannot be read: {e}") from None
        return image.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
