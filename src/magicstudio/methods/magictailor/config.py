"""MagicTailor settings: one dataclass, three presets.

``paper``: the paper (arXiv 2410.13370, Sec. 4.1 and the appendix). ``official``: what the authors' script runs
where it differs (../shared/METHODS.md): ``--scale_lr`` (both learning rates times the number of training images)
and their constant scheduler, which puts the DS-Bal learning rate back to the warm-up one after DS-Bal's first
step (299 of the 300 DS-Bal steps at the warm-up rate). ``smoke``: the tiny model, a few cheap steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserError
from ...training.config import TrainConfig, build_config

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"  # the authors' base model

#: class words the FaceAnalyzer localises (data/faces.py): word -> how its mask is made from the face, head and
#: person masks of a prepared photo ("hair" = head AND NOT face)
FACE_CLASSES = {"face": "face", "head": "head", "person": "person", "man": "person", "woman": "person",
                "boy": "person", "girl": "person", "hair": "hair", "hairstyle": "hair"}


@dataclass
class TailorConfig(TrainConfig):
    """The shared settings with MagicTailor's defaults, and its own. Tokens: ``<v0>`` for the concept, ``<v1>``,
    ``<v2>``, ... for the components, each initialised from its class word."""

    model: str = SD21_BASE
    concept_class: str = "person"  # the concept's class word (<v0>'s init and, for face classes, its automatic mask)
    component_classes: str = "hair"  # the components' class words, comma-separated (<v1>, <v2>, ...)
    masks_dir: str | None = None  # user masks: DIR/<stem>.png (the image's own entity) or DIR/<word>/<stem>.png
    # optimisation (paper Sec. 4.1; METHODS.md): AdamW, weight decay 1e-2, grad clip 1.0
    warmup_steps: int = 200
    dsbal_steps: int = 300
    warmup_lr: float = 1e-4
    dsbal_lr: float = 1e-5
    scale_lr: bool = False  # official: both lrs times the number of training images (--scale_lr)
    dsbal_lr_first_step_only: bool = False  # official: the constant scheduler resets the lr after DS-Bal's 1st step
    weight_decay: float = 1e-2
    grad_clip: float | None = 1.0
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_targets: str = "tailor"  # to_q/to_k/to_v/to_out.0, proj_in, proj_out, ff.net.2
    # batching: 0 = every image of every concept at each step (the authors'); N = N images of each (drawn)
    images_per_concept: int = 0
    color_jitter: float = 0.1
    # losses
    lambda_attn: float = 0.01  # cross-attention loss, both stages
    attn_layers: str = "paper"  # the 16x16 (1/4 latent) cross-attention layers of the down and up blocks
    # DM-Deg (Sec. 3.2)
    use_dmdeg: bool = True
    dmdeg_dynamic: bool = True  # False: fixed intensity alpha (ablation)
    dmdeg_alpha: float = 0.5
    dmdeg_gamma: float = 32.0
    # DS-Bal (Sec. 3.3)
    use_dsbal: bool = True  # False: joint training of all concepts in the second stage too (ablation)
    ema_decay: float = 0.99
    lambda_pres: float = 0.2
    sample_prompt: str = "{v0} with {v1}"

    def __post_init__(self):
        # the shared token fields follow the class words (one source of truth): v1 = <v0>, v2 = <v1>
        words = self.component_words()
        self.v1, self.v2 = "<v0>", "<v1>"
        self.v1_init, self.v2_init = self.concept_class.strip(), (words[0] if words else "")

    def component_words(self) -> list[str]:
        return [w.strip() for w in self.component_classes.split(",") if w.strip()]

    def tokens(self) -> list[str]:
        return [f"<v{i}>" for i in range(1 + len(self.component_words()))]

    def class_words(self) -> list[str]:
        return [self.concept_class.strip(), *self.component_words()]

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.dsbal_steps


PRESETS: dict[str, dict] = {
    "paper": {},
    # the authors' train script (../shared/METHODS.md); lrs scaled by the image count at setup
    "official": dict(scale_lr=True, dsbal_lr_first_step_only=True),
    "smoke": dict(model="tiny", warmup_steps=16, dsbal_steps=16, warmup_lr=1e-3, dsbal_lr=1e-3, lora_rank=4,
                  lora_alpha=4.0, checkpoint_every=16, sample_steps=4),
}


def make_config(preset: str = "paper", **overrides) -> TailorConfig:
    cfg = build_config(TailorConfig, PRESETS, preset, overrides, "MagicTailor setting")
    validate(cfg)
    return cfg


def validate(cfg: TailorConfig) -> None:
    if cfg.warmup_steps < 0 or cfg.dsbal_steps < 0 or cfg.total_steps == 0:
        raise UserError("warmup_steps and dsbal_steps must be >= 0, and at least one of them > 0")
    if not cfg.concept_class.strip() or any(c.isspace() for c in cfg.concept_class.strip()):
        raise UserError(f"the concept's class word must be one word, not {cfg.concept_class!r}")
    words = cfg.component_words()
    if not words:
        raise UserError("at least one component is needed (e.g. --component hair=DIR)")
    if len(set(cfg.class_words())) != len(cfg.class_words()):
        raise UserError(f"the concept and components need different class words, got {', '.join(cfg.class_words())}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1), not {cfg.ema_decay}")
    if cfg.images_per_concept < 0:
        raise UserError("images_per_concept must be >= 0 (0: all images)")
    if cfg.dmdeg_alpha < 0 or cfg.dmdeg_gamma <= 0:
        raise UserError("dmdeg_alpha must be >= 0 and dmdeg_gamma > 0")
    if cfg.lora_rank < 1:
        raise UserError("lora_rank must be >= 1")
    try:
        cfg.sample_prompt.format(**{f"v{i}": t for i, t in enumerate(cfg.tokens())})
    except (KeyError, IndexError, ValueError):
        raise UserError(f"sample_prompt {cfg.sample_prompt!r} may only use {{v0}}..{{v{len(words)}}}") from None
