"""Presets: named, validated bundles of models, devices, resolution and limits.

A preset is a built-in name (``duogen_agents.presets.BUILTIN``) or a TOML / JSON file with the same
fields. The ``tiny`` preset uses random-weight checkpoints built locally (no download): its text and
pictures are noise, useful only to run the real code end to end.

>>> load_preset("tiny").planner.model
'tiny:qwen2_5_vl'
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from duogen_agents.errors import ConfigError
from duogen_agents.validation import MAX_SEED

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


class _Strict(BaseModel):
    # strict: a preset file's ``steps = true`` or ``steps = 4.0`` is an error, not 1 or 4.
    model_config = ConfigDict(extra="forbid", strict=True)


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", re.DOTALL)


def strip_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part (what a message may show of it)."""
    parts = _AUTHORITY.match(url)
    if parts is None or "@" not in parts[2]:
        return url
    return parts[1] + parts[2].rsplit("@", 1)[1] + parts[3]


def userinfo_problem(role: str, url: str) -> str | None:
    """Why ``url`` cannot be a base URL, or None: credentials in it (``http://user:password@host``)
    would be shown in every error line, stored turn and checkpoint that names the server."""
    if strip_userinfo(url) == url:
        return None
    return (
        f"{role} base_url {strip_userinfo(url)!r} carries credentials (user:password@); remove them "
        "and put the key in an environment variable named by api_key_env"
    )


class _Remote(_Strict):
    """Where a model behind an OpenAI-compatible server is (``backend`` other than local)."""

    base_url: str | None = Field(
        None, description="remote backends: the server's OpenAI API root, e.g. http://localhost:8000/v1"
    )
    api_key_env: str | None = Field(
        None, pattern=_ENV_NAME, description="remote backends: NAME of the environment variable holding the API key"
    )
    timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="remote backends: seconds each wait may last (to connect, for each part of an answer, before a "
        "retry); a call's deadline is timeout_s x (max_retries + 1)",
    )
    max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="remote backends: retries (exponential backoff) on 408/409/429/5xx and lost connections",
    )
    extra_body: dict[str, Any] | None = Field(
        None, description="remote backends: engine-specific fields added to every request body (e.g. top_k)"
    )

    def _check_remote(self, role: str, remote: bool) -> None:
        if remote:
            if not self.base_url:
                raise ValueError(f"a remote {role} needs base_url, e.g. http://localhost:8000/v1")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"{role} base_url {strip_userinfo(self.base_url)!r} must start with http:// or https://"
                )
            if problem := userinfo_problem(role, self.base_url):
                raise ValueError(problem)


PlannerBackend = Literal["transformers", "openai"]


class PlannerSpec(_Remote):
    """The multimodal LLM.

    - ``backend = "transformers"`` (default): ``model`` is a hub id, a local folder, or ``tiny:<family>``.
    - ``backend = "openai"``: an OpenAI-compatible server (vLLM, SGLang) at ``base_url``; ``model`` is
      the name it serves (default: the first of its ``/v1/models``). Actions are decoded under the JSON
      schema through the ``structured_output`` field of the request.
    """

    backend: PlannerBackend = "transformers"
    model: str | None = None
    structured_output: Literal["response_format", "structured_outputs", "guided_json"] = Field(
        "response_format",
        description="openai backend: the request field that carries the action schema: OpenAI's response_format "
        "(vLLM, SGLang), vLLM's structured_outputs (>= 0.10.2) or guided_json (older vLLM)",
    )
    dtype: Dtype = "auto"
    device: str = "auto"
    max_new_tokens: int = Field(
        8192, ge=16, le=32768, description="cap for one planner call; must hold the largest action"
    )
    max_text_chars: int = Field(800, ge=8, le=8000, description="longest text chunk per action")
    max_prompt_chars: int = Field(300, ge=8, le=2000, description="longest image prompt")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    min_pixels: int | None = Field(None, ge=1, description="vision input size floor, in pixels")
    max_pixels: int | None = Field(None, ge=1, description="vision input size cap, in pixels")
    prefix_cache: int = Field(
        4, ge=0, le=256, description="sessions whose KV cache is kept between planner calls (0: off)"
    )
    compile: bool = Field(
        False,
        description="static KV cache and torch.compile (CUDA graphs) of the decode step; GPU, compiles on first use",
    )
    static_cache_tokens: int = Field(
        16384, ge=256, le=262144, description="compile: tokens the static KV cache holds (longer calls run eagerly)"
    )
    jump_forward: bool = Field(
        True,
        description="under a grammar, text the grammar forces (an action's keys and punctuation) enters in one "
        "forward, not a token at a time",
    )

    @model_validator(mode="after")
    def _backend_fields(self) -> PlannerSpec:
        remote = self.backend == "openai"
        self._check_remote("planner", remote)
        if not remote and not self.model:
            raise ValueError("a transformers planner needs model: a hub id, a local folder or tiny:<family>")
        if remote and self.model and self.model.startswith("tiny:"):
            raise ValueError(
                f"model {self.model!r} is a local tiny checkpoint; an openai planner names the model its server "
                "serves (or leaves model out to use the server's first)"
            )
        return self

    def describe(self) -> str:
        if self.backend == "openai":
            return f"{self.model or 'the served model'} at {self.base_url}"
        return str(self.model)


ImageFamily = Literal["cosmos2", "flux2-klein", "aligned"]
# Frames between the last reference and the image ``continue`` returns, at 16 fps: 28 frames is
# 1.75 s, far enough for "the next step" to have happened while the scene still holds (the model is
# trained on 93-frame clips; 4 frames, 0.25 s, gives back a near-copy of the last reference).
DEFAULT_HORIZON_FRAMES = 28


ImageBackend = Literal["local", "openai-images"]
RemoteKind = Literal["generate", "edit", "continue"]


class ImageSpec(_Remote):
    """An image family and its settings.

    - ``cosmos2``: Cosmos-Predict2 ``text2image`` (generate) and ``video2world`` (continue, 1..5
      references, the new image ``horizon_frames`` after the last one).
    - ``flux2-klein``: FLUX.2 [klein] ``model`` (generate, and generate/edit with up to
      ``max_references`` reference images in one call).

    ``references`` names the family that draws ``generate``/``edit`` with references when this one
    cannot (Cosmos): it draws on this spec's canvas (height, width). Without one, the planner is never
    offered those kinds.

    ``backend = "openai-images"``: an OpenAI Images endpoint (vLLM-Omni, SGLang Diffusion) at
    ``base_url`` draws instead of a local family (``family`` and the checkpoint fields are not used):
    ``generate`` without references through ``/v1/images/generations``, the ``kinds`` with references
    (up to ``max_references`` images) through ``/v1/images/edits``, at ``width`` x ``height``.
    """

    backend: ImageBackend = "local"
    kinds: list[RemoteKind] = Field(
        default_factory=lambda: list[RemoteKind](["generate", "edit"]),
        description="openai-images: the kinds drawn with references through /v1/images/edits",
    )
    family: ImageFamily = "cosmos2"
    model: str | None = Field(None, description="flux2-klein: hub id, local folder or tiny:flux2-klein")
    text2image: str | None = Field(None, description="cosmos2: the Text2Image checkpoint")
    video2world: str | None = Field(None, description="cosmos2: the Video2World checkpoint")
    dtype: Dtype = "auto"
    device: str = "auto"
    height: int = Field(704, ge=16, le=4096, multiple_of=16)
    width: int = Field(1280, ge=16, le=4096, multiple_of=16)
    steps: int = Field(35, ge=1, le=200)
    guidance: float = Field(7.0, ge=0.0, le=30.0)
    negative_prompt: str | None = None
    max_sequence_length: int = Field(512, ge=8, le=1024)
    fps: int = Field(16, ge=1, le=60)
    horizon_frames: int = Field(DEFAULT_HORIZON_FRAMES, ge=1, le=88, description="cosmos2 continue: frames ahead")
    max_references: int = Field(4, ge=1, le=10, description="flux2-klein and openai-images: reference images per call")
    safety_checker: Literal["guardrail", "none"] = Field(
        "guardrail", description="cosmos2: 'guardrail' needs the cosmos_guardrail package; 'none' passes all"
    )
    compile: bool = Field(
        False, description="regional torch.compile of the DiT's blocks (GPU; compiles once per process)"
    )
    first_block_cache: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="cosmos2 and aligned: First Block Cache threshold (as diffusers' FirstBlockCacheConfig): "
        "skip the DiT's other blocks at steps where the first block's residual changed less than this, "
        "relative (0: off)",
    )
    cfg_batch: bool = Field(
        False,
        description="cosmos2: guidance's conditional and unconditional DiT calls of a step run as one batch of "
        "two (the same picture, up to rounding; a second set of activations in memory)",
    )
    vae_tiling: bool = Field(
        False,
        description="the VAE encodes and decodes in overlapping tiles (diffusers' enable_tiling): at 704x1280 "
        "much less memory, somewhat slower; local families only",
    )
    frames: bool = Field(
        True, description="aligned: the last reference enters as a conditioning frame (false: a blank one)"
    )
    strength: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="aligned: sampling begins at this noise level from the connector's regressed latent "
        "(1.0: from pure noise; needs a connector trained with --regression > 0)",
    )
    keep: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="aligned: blended sampling; where the connector predicts a change below this (normalised "
        "latent units) the picture stays the conditioning frame's (0: off; needs a regression head trained on "
        "the change, aux_target delta)",
    )
    references: ImageSpec | None = None

    @model_validator(mode="after")
    def _family_models(self) -> ImageSpec:
        if self.references is not None and self.references.references is not None:
            raise ValueError("image.references cannot have references of its own")
        if self.first_block_cache > 0 and (self.backend == "openai-images" or self.family == "flux2-klein"):
            raise ValueError("image.first_block_cache applies to the local cosmos2 and aligned families only")
        if self.cfg_batch and (self.backend == "openai-images" or self.family != "cosmos2"):
            raise ValueError("image.cfg_batch applies to the local cosmos2 family only")
        if self.vae_tiling and self.backend == "openai-images":
            raise ValueError("image.vae_tiling applies to local image families only (the server decodes)")
        if self.backend == "openai-images":
            self._check_remote("image tool", True)
            return self
        if self.family == "cosmos2" and not (self.text2image and self.video2world):
            raise ValueError("the cosmos2 family needs text2image and video2world checkpoints")
        if self.family == "aligned" and not self.model:
            raise ValueError("the aligned family needs model: the aligned folder of `duogen train stage2`")
        if self.family == "flux2-klein" and not self.model:
            raise ValueError("the flux2-klein family needs a model checkpoint")
        return self

    @property
    def is_remote(self) -> bool:
        return self.backend == "openai-images"

    def describe(self) -> str:
        if self.is_remote:
            main = f"{self.model or 'the served model'} at {self.base_url}"
        else:
            main = str(self.model if self.family in ("flux2-klein", "aligned") else self.text2image)
        extra = f" + {self.references.describe()} for references" if self.references else ""
        return f"{main}{extra}"


class Limits(_Strict):
    """Bounds that make every turn finish, whatever the planner writes."""

    max_images: int = Field(8, ge=0, le=64)
    max_actions: int = Field(24, ge=1, le=256, description="planner actions per turn")
    max_turn_tokens: int = Field(16384, ge=64, description="planner tokens per turn, all calls together")
    redraw_budget: int = Field(1, ge=0, le=8, description="redraws per image after a failed check")
    check: bool = True
    plan_min_steps: int = Field(2, ge=1, le=32)
    plan_max_steps: int = Field(8, ge=1, le=32)
    max_drafts: int = Field(2, ge=1, le=8)
    max_references: int = Field(4, ge=1, le=16)

    @model_validator(mode="after")
    def _steps_order(self) -> Limits:
        if self.plan_min_steps > self.plan_max_steps:
            raise ValueError("plan_min_steps must not exceed plan_max_steps")
        return self


class Preset(_Strict):
    name: str
    description: str = ""
    planner: PlannerSpec
    image: ImageSpec
    critic: PlannerSpec | None = Field(
        None, description="a separate model that checks each image (default: the planner checks its own)"
    )
    limits: Limits = Field(default_factory=Limits)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    gpu_memory_gb: float | None = Field(None, description="approximate GPU memory the preset needs")
    offload: bool = Field(
        False,
        description="keep only the running model's weights on the GPU, the others in pinned CPU memory",
    )
    models_dir: str | None = Field(
        None, description="where built and downloaded model files live (default: $DUOGEN_MODELS, else <home>/models)"
    )

    def models_path(self, home: Path) -> Path:
        """Model files may live outside the data directory, so a small data disk is workable."""
        if self.models_dir:
            return Path(self.models_dir).expanduser()
        if env := os.environ.get("DUOGEN_MODELS"):
            return Path(env).expanduser()
        return home / "models"

    def action_tokens(self) -> dict[str, int]:
        """Tokens each kind of planner action can take at most (see ``actions.max_json_chars``)."""
        from duogen_agents.graphs.actions import max_action_tokens, worst_case_schemas

        p, lim = self.planner, self.limits
        schemas = worst_case_schemas(
            max_text=p.max_text_chars,
            max_prompt=p.max_prompt_chars,
            max_refs=lim.max_references,
            plan_max_steps=min(lim.plan_max_steps, max(1, lim.max_images)),
            plan_min_steps=min(lim.plan_min_steps, lim.plan_max_steps, max(1, lim.max_images)),
        )
        return {name: max_action_tokens(schema) for name, schema in schemas.items()}

    @model_validator(mode="after")
    def _aligned_needs_a_local_planner(self) -> Preset:
        images = [self.image, *([self.image.references] if self.image.references else [])]
        aligned = any(i.family == "aligned" and not i.is_remote for i in images)
        if aligned and self.planner.backend != "transformers":
            raise ValueError(
                "the aligned image family reads the planner's hidden states, so it needs a local planner "
                '(planner.backend = "transformers"), not a remote one'
            )
        return self

    @model_validator(mode="after")
    def _limits_hold_an_action(self) -> Preset:
        """Refuse limits that would cut a planner call mid-action, or leave no room for one action."""
        need = self.action_tokens()
        largest = max(v for k, v in need.items() if k != "plan_min")
        sizes = f"max_text_chars = {self.planner.max_text_chars}, max_prompt_chars = {self.planner.max_prompt_chars}"
        if self.planner.max_new_tokens < largest:
            raise ValueError(
                f"planner.max_new_tokens = {self.planner.max_new_tokens} cannot hold the largest action (up to "
                f"{largest} tokens with {sizes}); raise it to {largest} or lower those"
            )
        if self.limits.max_turn_tokens < need["interleaved"]:
            raise ValueError(
                f"limits.max_turn_tokens = {self.limits.max_turn_tokens} cannot hold one whole action (up to "
                f"{need['interleaved']} tokens with {sizes}); raise it or lower those"
            )
        return self

    def mode_problem(self, mode: str) -> str | None:
        """Why this preset's limits cannot produce an answer in ``mode``, or None."""
        lim = self.limits
        if mode in ("visual-plan", "draft") and lim.max_images < 1:
            return f"preset {self.name!r} allows no images (limits.max_images = 0), and {mode} draws at least one"
        need = self.action_tokens()
        least = {"visual-plan": need["plan_min"] + need["step"], "draft": 2 * need["draft"]}.get(mode, 0)
        if lim.max_turn_tokens < least:
            return (
                f"preset {self.name!r}: limits.max_turn_tokens = {lim.max_turn_tokens} cannot hold a {mode} answer "
                f"(its first actions take up to {least} tokens); raise it or lower planner.max_text_chars"
            )
        return None

    @property
    def is_shipped(self) -> bool:
        """Its weights ship inside the package (``SHIPPED``), trained by this project's own commands."""
        return Path(str(self.planner.model)).is_relative_to(SHIPPED)

    @property
    def is_tiny(self) -> bool:
        image = self.image
        names = [self.planner.model, image.model, image.text2image, image.references and image.references.model]
        return any(isinstance(n, str) and n.startswith("tiny:") for n in names)


_COSMOS_T2I = "nvidia/Cosmos-Predict2-2B-Text2Image"
_COSMOS_V2W = "nvidia/Cosmos-Predict2-2B-Video2World"


_TINY_CANVAS = {"device": "cpu", "dtype": "float32", "height": 64, "width": 64}


def _tiny_flux2(**overrides: object) -> ImageSpec:
    return ImageSpec(
        family="flux2-klein",
        model="tiny:flux2-klein",
        **_TINY_CANVAS,  # type: ignore[arg-type]
        steps=2,
        guidance=1.0,
        max_sequence_length=32,
        max_references=4,
        **overrides,  # type: ignore[arg-type]
    )


def _tiny(name: str, family: str, image_family: str = "cosmos2") -> Preset:
    """Random-weight models of the real classes, built locally: the real code path on a CPU."""
    family_name = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}[family]
    if image_family == "cosmos2":
        image = ImageSpec(
            text2image="tiny:text2image",
            video2world="tiny:video2world",
            **_TINY_CANVAS,  # type: ignore[arg-type]
            steps=4,
            guidance=3.0,
            negative_prompt="blurry",
            max_sequence_length=32,
            horizon_frames=8,  # the tiny DiT holds at most 8 latent frames
            safety_checker="none",
            references=_tiny_flux2(),
        )
        images = "Cosmos-Predict2 (+ FLUX.2 klein for references)"
    else:
        image = _tiny_flux2()
        images = "FLUX.2 klein"
    return Preset(
        name=name,
        description=f"random-weight {family_name} + {images} built locally; output is noise",
        planner=PlannerSpec(
            model=f"tiny:{family}",
            device="cpu",
            dtype="float32",
            max_new_tokens=1024,
            max_text_chars=48,
            max_prompt_chars=32,
            temperature=1.0,
            top_p=1.0,
        ),
        image=image,
        limits=Limits(max_images=4, max_actions=8, max_turn_tokens=4096, plan_max_steps=4),
    )


_FLUX2_KLEIN_4B = "black-forest-labs/FLUX.2-klein-4B"


def _flux2_klein_4b(**overrides: object) -> ImageSpec:
    # The 4B model is step-distilled: 4 steps, no classifier-free guidance.
    return ImageSpec(
        family="flux2-klein",
        model=_FLUX2_KLEIN_4B,
        dtype="bfloat16",
        height=1024,
        width=1024,
        steps=4,
        guidance=1.0,
        max_references=4,
        **overrides,  # type: ignore[arg-type]
    )


# Presets whose trained weights ship inside the package (examples/shapes/ship.py writes them): each a
# folder with a preset.json whose model paths are relative to it.
SHIPPED = Path(__file__).resolve().parent / "weights"


def shipped_preset(folder: Path) -> Preset:
    """The preset of a folder of weights with its ``preset.json`` (model paths relative to the folder)."""
    spec = json.loads((folder / "preset.json").read_text())
    spec["planner"]["model"] = str(folder / spec["planner"]["model"])
    spec["image"]["model"] = str(folder / spec["image"]["model"])
    return Preset.model_validate(spec)


def _shipped(name: str) -> dict[str, Preset]:
    """``{name: preset}`` for the shipped folder ``name``, or nothing when it is absent (or unreadable:
    a warning then, so that one broken folder does not break every command)."""
    folder = SHIPPED / name
    if not (folder / "preset.json").is_file():
        return {}
    try:
        return {name: shipped_preset(folder)}
    except (OSError, ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        import warnings

        warnings.warn(f"the shipped preset {name!r} in {folder} is unreadable and left out: {e}", stacklevel=2)
        return {}


BUILTIN: dict[str, Preset] = {
    "tiny": _tiny("tiny", "qwen2_5_vl"),
    "tiny-qwen3": _tiny("tiny-qwen3", "qwen3_vl"),
    "tiny-flux2": _tiny("tiny-flux2", "qwen2_5_vl", "flux2-klein"),
    **_shipped("shapes"),  # trained on this world on a CPU (README, "Training"); absent until shipped
    # compile: the planner's decode step (static cache, CUDA graphs) and the DiT's blocks, on a GPU
    # (ignored elsewhere). Measured faster on an H200 at these shapes (README "Speed and memory"), so on
    # for the presets of the measured classes: Qwen2.5-VL planners, Cosmos-Predict2 DiTs. cfg_batch
    # (guidance's two DiT calls as one batch) measured faster on the H200 with the DiT compiled (0.93 of
    # unbatched for a text-to-image draw, 0.98 for Video2World) at the same peak, so on where the DiT is.
    "qwen2.5-vl-7b+cosmos2-2b": Preset(
        name="qwen2.5-vl-7b+cosmos2-2b",
        description="Qwen2.5-VL-7B-Instruct planner, Cosmos-Predict2-2B image tool (704x1280)",
        planner=PlannerSpec(
            model="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16", max_pixels=512 * 28 * 28, compile=True
        ),
        image=ImageSpec(
            text2image=_COSMOS_T2I, video2world=_COSMOS_V2W, dtype="bfloat16", compile=True, cfg_batch=True
        ),
        gpu_memory_gb=44,
    ),
    # The same models on a 24 GB card: only the running model's weights on the GPU (see
    # models/residency.py). Peak as below (28 frames ahead, the VAE in tiles, one arena), measured with
    # benchmarks/visual_plan.py --offload on an H200 (random weights at these shapes, 2026-11-28): 17.73
    # GiB allocated (19.0 GB), 19.59 GiB reserved, CUDA context not included (estimated on the CPU at
    # 17.66 for that plan's draws, benchmarks/memory_estimate.py). planner.compile may go with offload (the
    # arena keeps the weights' addresses) but stays off until the two have been measured together; so
    # does cfg_batch (measured only at 3 frames ahead, every model resident).
    "qwen2.5-vl-7b+cosmos2-2b-24gb": Preset(
        name="qwen2.5-vl-7b+cosmos2-2b-24gb",
        description="Qwen2.5-VL-7B planner, Cosmos-Predict2-2B (704x1280), idle model offloaded: one 24 GB card",
        planner=PlannerSpec(model="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16", max_pixels=512 * 28 * 28),
        # The VAE's activations were most of the peak (the Video2World decode); tiles bound them.
        image=ImageSpec(text2image=_COSMOS_T2I, video2world=_COSMOS_V2W, dtype="bfloat16", vae_tiling=True),
        offload=True,
        gpu_memory_gb=24,
    ),
    "qwen3-vl-8b+cosmos2-2b": Preset(
        name="qwen3-vl-8b+cosmos2-2b",
        description="Qwen3-VL-8B-Instruct planner, Cosmos-Predict2-2B image tool (704x1280)",
        planner=PlannerSpec(model="Qwen/Qwen3-VL-8B-Instruct", dtype="bfloat16", max_pixels=512 * 32 * 32),
        image=ImageSpec(
            text2image=_COSMOS_T2I, video2world=_COSMOS_V2W, dtype="bfloat16", compile=True, cfg_batch=True
        ),
        gpu_memory_gb=46,
    ),
    "qwen2.5-vl-3b+cosmos2-2b-fast": Preset(
        name="qwen2.5-vl-3b+cosmos2-2b-fast",
        description="Qwen2.5-VL-3B planner, Cosmos-Predict2-2B at 480x848 with 20 steps, for 24-40 GB cards",
        planner=PlannerSpec(
            model="Qwen/Qwen2.5-VL-3B-Instruct", dtype="bfloat16", max_pixels=256 * 28 * 28, compile=True
        ),
        image=ImageSpec(
            text2image=_COSMOS_T2I,
            video2world=_COSMOS_V2W,
            dtype="bfloat16",
            height=480,
            width=848,
            steps=20,
            compile=True,
            cfg_batch=True,
        ),
        gpu_memory_gb=34,
    ),
    # Memory from sizes, not measured: bf16 weights of Qwen2.5-VL-3B (7.5 GB) + FLUX.2 klein 4B
    # (transformer 7.8 GB, Qwen3-4B text encoder 8.0 GB, VAE 0.2 GB), plus activations at 1024x1024.
    "qwen2.5-vl-3b+flux2-klein-4b": Preset(
        name="qwen2.5-vl-3b+flux2-klein-4b",
        description="Qwen2.5-VL-3B planner, FLUX.2 klein 4B (Apache-2.0) with multi-reference generate/edit, 1024x1024",
        planner=PlannerSpec(
            model="Qwen/Qwen2.5-VL-3B-Instruct", dtype="bfloat16", max_pixels=256 * 28 * 28, compile=True
        ),
        image=_flux2_klein_4b(),
        gpu_memory_gb=28,
    ),
    # Qwen3-VL-8B is 17.5 GB in bf16; with FLUX.2 klein 4B about 34 GB of weights.
    "qwen3-vl-8b+flux2-klein-4b": Preset(
        name="qwen3-vl-8b+flux2-klein-4b",
        description="Qwen3-VL-8B planner, FLUX.2 klein 4B (Apache-2.0) with multi-reference generate/edit, 1024x1024",
        planner=PlannerSpec(model="Qwen/Qwen3-VL-8B-Instruct", dtype="bfloat16", max_pixels=512 * 32 * 32),
        image=_flux2_klein_4b(),
        gpu_memory_gb=38,
    ),
}


def _read_file(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read preset file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"preset file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"preset file {path} is nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"preset file {path} is not valid {path.suffix.lstrip('.').upper()}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold an object/table at the top level")
    return data


def _switches_backend(base: dict[str, Any], override: dict[str, Any]) -> bool:
    """A section that moves to another backend than its base's (a remote planner over ``tiny``, say)
    is taken as written: the base's local checkpoints mean nothing to a server."""
    return "backend" in override and override["backend"] != base.get("backend")


# A section's switches that one family alone takes (ImageSpec refuses them elsewhere): a file that moves
# its base to another family leaves them at their defaults unless it sets them itself.
_FAMILY_SWITCHES = ("cfg_batch",)


def _family_free(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    if "family" not in override or override["family"] == base.get("family"):
        return base
    return {k: v for k, v in base.items() if k not in _FAMILY_SWITCHES}


def _beside(data: dict[str, Any], folder: Path) -> None:
    """Model folders named relative to the preset file, whatever the working directory: a path that
    starts with ``./`` or ``../`` (as ``duogen train`` writes them) always, so a missing folder is
    reported by its place; a bare relative name that exists beside the file (``model = "planner"``, as
    in the shipped ``weights/shapes/preset.json``). Anything else (a hub id, ``tiny:...``, an absolute
    path, a bare folder name found only from the working directory) is left as written, and so is a
    remote section's ``model`` (the name its server serves, which may well be "planner")."""

    def fix(section: Any) -> None:
        if not isinstance(section, dict):
            return
        keys = () if section.get("backend") in ("openai", "openai-images") else ("model", "text2image", "video2world")
        for key in keys:
            value = section.get(key)
            if isinstance(value, str) and value and ":" not in value and not Path(value).expanduser().is_absolute():
                if value.startswith(("./", "../")) or (folder / value).is_dir():
                    section[key] = str((folder / value).resolve())
        fix(section.get("references"))

    for name in ("planner", "critic", "image"):
        fix(data.get(name))


def load_preset(name_or_path: str | Path | Preset) -> Preset:
    """Return a built-in preset by name, or load and validate a ``.toml`` / ``.json`` preset file.

    A file may name a built-in preset in ``base`` and override only some fields; a section
    (``planner``, ``image``, ``critic``) that names another ``backend`` than the base's is taken as
    written, not merged with the base's. A model folder named relative to the file, and found there,
    is read from there.
    """
    if isinstance(name_or_path, Preset):
        return name_or_path
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key].model_copy(deep=True)
    path = Path(key).expanduser()
    if path.suffix.lower() not in (".toml", ".json"):
        known = ", ".join(BUILTIN)
        raise ConfigError(f"unknown preset {key!r}; choose one of: {known}, or give a .toml/.json preset file")
    if not path.exists():
        raise ConfigError(f"preset file not found: {path}")
    data = _read_file(path)
    _beside(data, path.resolve().parent)
    base = data.pop("base", None)
    data.setdefault("name", path.stem)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f'preset file {path}: base must be a preset name in quotes, e.g. base = "tiny"')
        if base not in BUILTIN:
            raise ConfigError(f"preset file {path}: unknown base preset {base!r}")
        merged = BUILTIN[str(base)].model_dump()
        for k, v in data.items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict) and not _switches_backend(merged[k], v):
                merged[k] = {**_family_free(merged[k], v), **v}
            else:
                merged[k] = v
        data = merged
    try:
        return Preset.model_validate(data)
    except RecursionError:
        raise ConfigError(f"preset file {path} is nested too deeply") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"preset file {path}: {where}: {first['msg']}") from e
