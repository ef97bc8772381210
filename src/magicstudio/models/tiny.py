"""The built-in ``tiny`` model: SD 1.5's architecture at toy width with random weights.

Same classes and block layout as Stable Diffusion 1.5 (``UNet2DConditionModel`` with three cross-attention
down blocks and three cross-attention up blocks, an ``AutoencoderKL`` with the usual 8x downscale and 4 latent
channels, a ``CLIPTextModel`` and the real CLIP BPE tokenizer), so module names, LoRA targets, attention
processors and export formats are exercised exactly as on the real model. Deterministic from a seed. It makes
meaningless images by design: it is for tests and the demo.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .components import Components
from .tokenizer import load_clip_tokenizer

TINY_RESOLUTION = 128

UNET_CONFIG = dict(
    sample_size=TINY_RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=TINY_RESOLUTION,
    scaling_factor=0.18215,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_tiny(seed: int = 0) -> Components:
    """Build the tiny model with weights drawn from ``seed`` (same seed -> identical weights)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    devnull_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    finally:
        torch.random.set_rng_state(devnull_state)
    for m in (unet, vae, text_encoder):
        m.eval()
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    return Components(
        tokenizer=load_clip_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        source="tiny",
        resolution=TINY_RESOLUTION,
        family="sd1",
        extra={"seed": seed},
    )


def write_tiny(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model as a standard diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    out = Path(out_dir)
    comps = build_tiny(seed)
    pipe = comps.pipeline(scheduler=comps.inference_scheduler("pndm"))
    pipe.save_pretrained(str(out), safe_serialization=True)
    # save_pretrained stores the sampling scheduler; keep the training one's config identical (same betas).
    return out
