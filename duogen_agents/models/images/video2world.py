"""Cosmos-Predict2 Video2World that encodes only its conditioning frames.

Diffusers' ``Cosmos2VideoToWorldPipeline.prepare_latents`` pads the conditioning clip to the whole
clip it samples (repeating the last frame) and encodes all of it through the VAE, then keeps the
latents of the conditioning frames only (``cond_indicator`` zeroes the rest). At the presets' 28
frames ahead that is 29 frames through the encoder for the one that counts (33 for five): at 704x1280
about 135 TFLOP instead of 6.3 with one reference (``benchmarks/video2world_encode.py`` counts and
times it).

The Wan VAE encoder is causal in time (the first frame alone, then groups of four, each seeing only
earlier frames through its cache), so the conditioning frames' latents do not depend on the padding
after them. This pipeline encodes only those frames, and samples their latents from the same noise the
whole clip's sample would have drawn (noise of the whole latent shape, from the same generator, so the
generator also ends in the same state for the noise that follows). The frames past the conditioning
get zero latents, which the pipeline multiplies by zero anyway. Everything else is diffusers' own code.
The result is the pipeline's own, to the bit on a CPU (``tests/test_image_families.py`` compares the
latents); on a GPU the one call whose shape differs, the VAE's 1x1x1 ``quant_conv`` over the encoded
frames (untiled), may round differently, which has not been run. Only a Wan VAE packing four frames
into a latent frame is causal in the way this relies on; with any other VAE the pipeline is diffusers'.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKLWan, Cosmos2VideoToWorldPipeline
from diffusers.utils.torch_utils import randn_tensor


class _ConditioningOnlyVAE:
    """Stands in for the VAE inside ``prepare_latents`` only: ``encode`` encodes the first ``frames``
    frames of the padded clip; everything else is the real VAE's."""

    def __init__(self, vae: Any, frames: int, temporal: int) -> None:
        self._vae, self._frames, self._temporal = vae, frames, temporal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    def encode(self, video: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        whole = (video.size(2) - 1) // self._temporal + 1  # latent frames of the padded clip
        out = self._vae.encode(video[:, :, : self._frames], *args, **kwargs)
        if isinstance(out, tuple):  # return_dict=False
            return (_Sample(out[0], whole),)
        return SimpleNamespace(latent_dist=_Sample(out.latent_dist, whole))


class _Sample:
    """``DiagonalGaussianDistribution.sample`` over the whole clip's latent shape, of which the
    conditioning part is computed and the rest is zero."""

    def __init__(self, dist: Any, whole: int) -> None:
        self.dist, self.whole = dist, whole

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.dist.mean, self.dist.std
        shape = (*mean.shape[:2], self.whole, *mean.shape[3:])
        noise = randn_tensor(shape, generator=generator, device=self.dist.parameters.device, dtype=mean.dtype)
        kept = mean + std * noise[:, :, : mean.size(2)]
        return torch.nn.functional.pad(kept, (0, 0, 0, 0, 0, self.whole - mean.size(2)))  # zero frames after


class ConditioningVideo2World(Cosmos2VideoToWorldPipeline):
    """``Cosmos2VideoToWorldPipeline`` whose VAE encodes the conditioning frames only (module doc)."""

    def prepare_latents(self, video: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        vae = self.vae
        if not (isinstance(vae, AutoencoderKLWan) and self.vae_scale_factor_temporal == 4):
            return super().prepare_latents(video, *args, **kwargs)
        bound = inspect.signature(super().prepare_latents).bind(video, *args, **kwargs)
        bound.apply_defaults()
        cond = min(video.size(2), bound.arguments["num_frames"])
        # Swapped in the instance's __dict__ for this call only (register_modules would rewrite the
        # pipeline's config); a draw holds the device's turn lock, so nothing else uses the pipeline.
        self.__dict__["vae"] = _ConditioningOnlyVAE(vae, cond, self.vae_scale_factor_temporal)
        try:
            return super().prepare_latents(*bound.args, **bound.kwargs)
        finally:
            self.__dict__["vae"] = vae
