"""MagiCapture settings: one dataclass, three presets.

``paper``: the paper (arXiv 2309.06895, Experiments + supplement). ``official``: the authors' code where it
differs (../shared/METHODS.md). ``smoke``: a few hundred cheap steps for CPUs and tests, with learning rates
high enough that the mechanisms visibly act within that budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserError
from ...models.precision import PRECISIONS
from ...training.config import TrainConfig, build_config


@dataclass
class CaptureConfig(TrainConfig):
    """The shared settings (``training.config.TrainConfig``) with MagiCapture's defaults, and its own."""

    object_class: str = "object"  # mode "object": the supplement's general-object variant
    # tokens (Sec. Method; METHODS.md: <v1> from "person", <v2> from N(0, 0.017^2))
    v2_init: str = "noise:0.017"
    # phase 1: textual inversion (Eq. 9)
    ti_steps: int = 1200
    ti_lr: float = 5e-4
    ti_t_max: int = 1000
    ti_weight_decay: float = 1e-2  # paper: silent (the loop's AdamW default); authors: 0 (--weight_decay_ti=0.000)
    # authors (--clip_ti_decay): after every phase-1 optimizer step each new embedding's norm moves toward 0.4 by
    # min(1, 100 * lr) of the gap (None: off, as the paper says nothing of it)
    ti_norm_target: float | None = None
    # phase 2: LoRA + embeddings (Eq. 10)
    lora_steps: int = 1500
    lora_lr: float = 1e-4
    emb_lr: float = 1e-5
    text_lora_lr: float = 1e-5  # the text-encoder LoRA (text_lora=True; the authors' --learning_rate_text)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "cross_attn"
    text_lora: bool = False
    lora_t_max: int = 1000
    lambda_id: float = 1.0
    lambda_attn: float = 2.5
    # authors: the reference and composed losses count this many times in the first half of phase 2 (paper: 1)
    early_ref_comp_weight: float = 1.0
    t_id_max: int = 800  # T' < T for the Tweedie estimate of Eq. 7
    id_pass: str = "shared"  # "shared": one UNet pass at t ~ U[0, T') for L_c and L_id; "separate": a second pass
    use_ar: bool = True
    use_composed: bool = True
    use_id: bool = True
    ar_layers: str = "paper"
    mask_mode: str = "paper"
    # optimisation: one image per micro-step (the paper's batch 1), gradients of grad_accum micro-steps summed
    grad_accum: int = 4
    weight_decay: float = 1e-2
    lr_schedule: str = "linear"  # linear decay to 0 within each phase, or "constant"
    # data augmentation (METHODS.md)
    color_jitter: float = 0.1
    # identity loss
    face_encoder: str | None = None
    # where the identity loss crops x0_hat: "detect" (the paper, Sec. 3.2, and the authors: a face detector on
    # x0_hat; the mediapipe FaceAnalyzer here, the loss skipped when it finds no face) or "reference" (the
    # pseudo-label's landmarks: x0_hat is meant to reproduce the reference image, so its face sits there; works
    # where no detector can see a face, as in the tiny and toy-world models' images)
    id_landmarks: str = "detect"
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

    @property
    def total_steps(self) -> int:
        return self.ti_steps + self.lora_steps


PRESETS: dict[str, dict] = {
    "paper": {},
    # the authors' train_magicapture.sh / magicapture_train.py (../shared/METHODS.md); tests/test_presets.py
    "official": dict(
        ti_lr=2e-3,  # --learning_rate_ti=5e-4 x 4 (--scale_lr: x grad accumulation 4 x batch 1)
        lora_lr=4e-4,  # --learning_rate_unet=1e-4 x 4
        text_lora_lr=4e-5,  # --learning_rate_text=1e-5 x 4
        emb_lr=1e-4,  # --continue_inversion_lr=1e-4
        ti_weight_decay=0.0,  # --weight_decay_ti=0.000
        weight_decay=1e-3,  # --weight_decay_lora=0.001
        grad_accum=1,  # --gradient_accumulation_steps=4 has no effect in either of their loops
        ti_norm_target=0.4,  # --clip_ti_decay
        early_ref_comp_weight=2.0,  # their loss: reference and composed doubled in the first half of phase 2
        id_landmarks="detect",  # RetinaFace on x0_hat
        lora_targets="attn_ff",
        text_lora=True,
        lambda_id=0.25,  # --lambda_arc=0.25
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
        id_landmarks="reference",  # no detector finds a face in the tiny / toy models' images
    ),
}


def make_config(preset: str = "paper", **overrides) -> CaptureConfig:
    cfg = build_config(CaptureConfig, PRESETS, preset, overrides, "MagiCapture setting")
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
    if cfg.grad_accum < 1:
        raise UserError("gradient accumulation must be >= 1")
    if cfg.id_landmarks not in ("detect", "reference"):
        raise UserError("id_landmarks must be 'detect' or 'reference'")
    if cfg.ti_norm_target is not None and not cfg.ti_norm_target > 0:
        raise UserError("ti_norm_target must be > 0 (or None: off)")
