"""The baselines' ``paper`` presets against their sources, setting by setting (issue 13). Sources: MagiCapture's
supplement (arXiv 2309.06895: how the paper ran each baseline; summarised in ../shared/METHODS.md, "Paper's
protocol") and each original method's paper / reference code for what the supplement does not say."""

from __future__ import annotations

from dataclasses import asdict

from magicstudio.methods.baselines import custom_diffusion, dreambooth, textual_inversion

COMMON = dict(
    per_concept=1,  # supplement: batch 2 = one source + one reference image per step
    grad_accum=1,  # supplement: no accumulation mentioned for the baselines
    t_max=1000,  # every original: t ~ U[0, T) over the whole schedule
    lr_schedule="constant", lr_warmup_steps=0,  # every original: constant lr, no warm-up
    weight_decay=1e-2,  # TI: torch AdamW default (Gal et al. code); DB/CD: AdamW 1e-2 (their scripts)
    color_jitter=0.0,  # no original jitters colours
    class_prompt="a photo of a person",  # the class noun of a portrait
)
TEXTUAL_INVERSION = COMMON | dict(
    steps=5000, lr=5e-3,  # supplement / METHODS.md: Textual Inversion lr 5e-3, 5000 steps
    prior=False,  # TI has no prior preservation
    templates="varied",  # Gal et al.: a random prompt template per example
    v1_init="person", v2_init="style",  # Gal et al.: the embedding starts from a coarse word for the concept
    grad_clip=None,  # Gal et al.'s code: no gradient clipping
    hflip=True,  # Gal et al.: random horizontal flip
)
DREAMBOOTH = COMMON | dict(
    steps=2000, lr=1e-6,  # supplement / METHODS.md: DreamBooth lr 1e-6, 2000 steps
    prior=True, prior_weight=1.0, num_class_images=200,  # supplement: prior preservation, lambda 1, 200 images
    v1_init="sks", v2_init="ohwx",  # Ruiz et al. Sec. 3.2: rare-token identifiers
    grad_clip=1.0,  # diffusers train_dreambooth.py: max_grad_norm 1.0
    hflip=False, templates="fixed",  # Ruiz et al.: one fixed prompt "a [V] [class]", no flip
)
CUSTOM_DIFFUSION = COMMON | dict(
    steps=750, lr=5e-6,  # supplement / METHODS.md: Custom Diffusion lr 5e-6, 750 steps
    prior=True, prior_weight=1.0, num_class_images=200,  # supplement: prior preservation, lambda 1, 200 images
    v1_init="ktn", v2_init="pll",  # Kumari et al.: modifier tokens from rare words
    grad_clip=1.0,  # Kumari et al.'s script: max_grad_norm 1.0
    hflip=True, templates="fixed",  # Kumari et al.: random flip; one fixed prompt "<new1> [class]"
)


def _check(module, expected):
    cfg = asdict(module.make_config("paper"))
    wrong = {k: (cfg[k], v) for k, v in expected.items() if cfg[k] != v}
    assert not wrong, wrong
    assert cfg["method"] == module.NAME


def test_textual_inversion_paper_preset():
    _check(textual_inversion, TEXTUAL_INVERSION)


def test_dreambooth_paper_preset():
    _check(dreambooth, DREAMBOOTH)


def test_custom_diffusion_paper_preset():
    _check(custom_diffusion, CUSTOM_DIFFUSION)
