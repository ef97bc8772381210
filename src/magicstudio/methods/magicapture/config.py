"""MagiCapture settings: one dataclass, three presets.

``paper``: the paper (arXiv 2309.06895, Experiments + supplement). ``official``: the authors' code where it
differs (../shared/METHODS.md). ``smoke``: a few hundred cheap steps for CPUs and tests, with learning rates
high enough that the mechanisms visibly act within that budget.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ...errors import UserError
from ...models.precision import PRECISIONS

SOURCE_TEMPLATES = [
    "a photo of a {v1} person",
    "a close-up photo of a {v1} person",
    "a portrait of a {v1} person",
    "a photo of the face of a {v1} person",
]
REFERENCE_TEMPLATES = [
    "a painting of a person in the style of {v2}",
    "a photo of a person in the style of {v2}",
    "a portrait of a person in the style of {v2}",
    "an image of a person in the {v2} style",
]
COMPOSED_TEMPLATES = [
    "a photo of a {v1} person in the style of {v2}",
    "a portrait of a {v1} person in the style of {v2}",
    "a painting of a {v1} person in the style of {v2}",
    "an image of a {v1} person in the {v2} style",
]
OBJECT_SOURCE_TEMPLATES = ["a photo of a {v1} {cls}", "a close-up photo of a {v1} {cls}"]
OBJECT_REFERENCE_TEMPLATES = ["a photo in the style of {v2}", "a picture in the {v2} style"]
OBJECT_COMPOSED_TEMPLATES = ["a photo of a {v1} {cls} in the style of {v2}", "a {v1} {cls} in the {v2} style"]


@dataclass
class CaptureConfig:
    preset: str = "paper"
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    resolution: int | None = None  # None: the base model's native size
    seed: int = 0
    mode: str = "portrait"  # or "object" (the supplement's general-object variant)
    object_class: str = "object"
    # tokens (Sec. Method; METHODS.md: <v1> from "person", <v2> from N(0, 0.017^2))
    v1: str = "<v1>"
    v2: str = "<v2>"
    v1_init: str = "person"
    v2_init: str = "noise:0.017"
    # phase 1: textual inversion (Eq. 9)
    ti_steps: int = 1200
    ti_lr: float = 5e-4
    ti_t_max: int = 1000
    # phase 2: LoRA + embeddings (Eq. 10)
    lora_steps: int = 1500
    lora_lr: float = 1e-4
    emb_lr: float = 1e-5
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "cross_attn"
    text_lora: bool = False
    lora_t_max: int = 1000
    lambda_id: float = 1.0
    lambda_attn: float = 2.5
    t_id_max: int = 800  # T' < T for the Tweedie estimate of Eq. 7
    id_pass: str = "shared"  # "shared": one UNet pass at t ~ U[0, T') for L_c and L_id; "separate": a second pass
    use_ar: bool = True
    use_composed: bool = True
    use_id: bool = True
    ar_layers: str = "paper"
    mask_mode: str = "paper"
    # optimisation
    batch_size: int = 1
    grad_accum: int = 4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    lr_schedule: str = "linear"  # linear decay to 0 within each phase, or "constant"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    deterministic: bool = False  # True: one intra-op thread on CPU, the same seed gives identical weights
    # data augmentation (METHODS.md)
    hflip: bool = True
    color_jitter: float = 0.1
    # identity loss
    face_encoder: str | None = None
    id_landmarks: str = "reference"  # "reference": the pseudo-label's landmarks; "detect": FaceAnalyzer on x0_hat
    id_region_decode: bool = True
    # the frozen VAE decoder in the identity / structure losses: auto (bf16 where native) | fp32 | bf16 | fp16
    decode_precision: str = "auto"
    # ... and its blocks recomputed in backward (same gradient, ~90% less activation memory): auto (for large
    # decoders) | on | off
    decode_checkpointing: str = "auto"
    # general-object mode, composed task (supplement Eq. 11): DINO structure + style losses
    dino_model: str | None = None  # hub id / folder of a DINO ViT (facebook/dino-vitb8), "tiny"; None: off (warned)
    lambda_ssim: float = 0.1
    lambda_contra: float = 0.2
    lambda_style: float = 2.0
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: only at the end
    sample_steps: int = 25
    log_every: int = 1

    def tokens(self) -> list[str]:
        return [self.v1, self.v2]

    @property
    def total_steps(self) -> int:
        return self.ti_steps + self.lora_steps


PRESETS: dict[str, dict] = {
    "paper": {},
    "official": dict(
        ti_lr=2e-3,  # 5e-4 scaled by gradient accumulation 4
        lora_targets="attn_ff",
        text_lora=True,
        lambda_id=0.25,
        weight_decay=1e-3,
        lora_t_max=800,
        id_pass="separate",
        mask_mode="official",
    ),
    "smoke": dict(
        model="tiny",
        ti_steps=60,
        lora_steps=240,
        ti_lr=5e-3,
        lora_lr=2e-3,
        emb_lr=1e-3,
        grad_accum=1,
        checkpoint_every=50,
        sample_steps=10,
        lr_schedule="constant",
        face_encoder="tiny",
        dino_model="tiny",
    ),
}


def make_config(preset: str = "paper", **overrides) -> CaptureConfig:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(CaptureConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    cfg = replace(CaptureConfig(), preset=preset, **PRESETS[preset])
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    validate(cfg)
    return cfg


def validate(cfg: CaptureConfig) -> None:
    if cfg.ti_steps < 0 or cfg.lora_steps < 0 or cfg.total_steps == 0:
        raise UserError("steps must be >= 0 and at least one phase must have steps")
    if not 0 < cfg.t_id_max <= 1000:
        raise UserError("t_id_max must be in (0, 1000]")
    if cfg.mode not in ("portrait", "object"):
        raise UserError("mode must be 'portrait' or 'object'")
    if cfg.decode_checkpointing not in ("auto", "on", "off"):
        raise UserError("decode_checkpointing must be auto, on or off")
    if cfg.decode_precision not in PRECISIONS:
        raise UserError(f"decode_precision must be one of {', '.join(PRECISIONS)}")
    if cfg.id_pass not in ("shared", "separate"):
        raise UserError("id_pass must be 'shared' or 'separate'")
    if cfg.v1 == cfg.v2:
        raise UserError("the identity and style tokens must differ")
    if cfg.grad_accum < 1 or cfg.batch_size < 1:
        raise UserError("batch size and gradient accumulation must be >= 1")
