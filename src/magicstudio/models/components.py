"""The Stable Diffusion parts every method works with, kept separate as in diffusers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Components:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of one base model.

    ``source`` says where they came from (``tiny``, a hub id, a folder or a file) and ``resolution`` is the
    image size the model was trained for (512 for SD 1.5 / 2.1-base, 768 for SD 2.x v-models, 128 for tiny).
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    source: str
    resolution: int
    family: str = "sd1"
    extra: dict = field(default_factory=dict)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def to(self, device=None, dtype=None) -> "Components":
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in (self.text_encoder, self.vae, self.unet):
            m.to(**kwargs)
        return self

    def pipeline(self, scheduler=None, cls=None):
        """A diffusers ``StableDiffusionPipeline`` over these very modules (no copies)."""
        from diffusers import StableDiffusionPipeline

        cls = cls or StableDiffusionPipeline
        return cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or self.inference_scheduler("ddim"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def inference_scheduler(self, name: str = "ddim"):
        """A sampling scheduler built from the training scheduler's config (same betas and prediction type)."""
        from .schedulers import make_scheduler

        return make_scheduler(name, self.scheduler.config)
