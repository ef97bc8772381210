"""DreamBooth (Ruiz et al. 2023, arXiv 2208.12242) as MagiCapture's paper ran it as a baseline.

Fine-tunes the whole UNet and the whole CLIP text encoder together. Paper supplement: prior preservation with
lambda 1.0 and 200 class images, each batch one source and one style image (each paired with a class image),
lr 1e-6, 2000 steps, sampling with 50 steps at guidance 7.5. The identifiers ``<v1>`` (identity) and ``<v2>``
(style) are new tokens whose embeddings start from rare words ("sks", "ohwx"), DreamBooth's rare-token
identifiers; they live in the embedding table, which trains with the rest of the text encoder. As in the
original: AdamW (weight decay 1e-2), constant lr, gradient clipping at 1.0.

A full fine-tune is not a LoRA, so the run folder holds the fine-tuned model itself as a diffusers folder
``RUN/model/`` (safetensors, its tokenizer knowing ``<v1>``/``<v2>``) and ``config.yaml`` says
``model_dir: model``, which ``load_run_pipeline`` honours. Checkpoints hold both models and their optimizer
state (~12 GB for SD 1.5), hence the sparse ``checkpoint_every``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ...training.runs import RunDir
from ...training.loop import Phase
from ...training.registry import MethodSpec, register
from .common import Baseline, BaselineConfig, make_baseline_config, run_baseline

NAME = "dreambooth"
MODEL_DIR = "model"

PRESETS: dict[str, dict] = {
    "paper": dict(steps=2000, lr=1e-6, prior=True, prior_weight=1.0, num_class_images=200, v1_init="sks",
                  v2_init="ohwx", weight_decay=1e-2, grad_clip=1.0, hflip=False, checkpoint_every=500),
    "smoke": dict(model="tiny", steps=30, lr=1e-4, prior=True, prior_weight=1.0, num_class_images=4, class_steps=5,
                  v1_init="sks", v2_init="ohwx", weight_decay=1e-2, grad_clip=1.0, hflip=False,
                  checkpoint_every=15, sample_steps=5),
}


class DreamBooth(Baseline):
    wrap_tokens = False  # the whole embedding table trains with the text encoder
    run_config = {"model_dir": MODEL_DIR}

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [Phase("dreambooth", cfg.steps, self._setup, cfg.lr_schedule, cfg.weight_decay, cfg.grad_clip,
                      cfg.lr_warmup_steps)]

    def _setup(self) -> list[dict]:
        unet, te = self.comps.unet, self.comps.text_encoder
        unet.requires_grad_(True)
        te.requires_grad_(True)
        if self.cfg.gradient_checkpointing:
            te.gradient_checkpointing_enable()
        return [{"params": list(unet.parameters()) + list(te.parameters()), "lr": self.cfg.lr}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        # no copies: the loop writes the checkpoint right away, and two copies of SD 1.5 are 4 GB
        state = {f"unet.{k}": v.detach() for k, v in self.comps.unet.state_dict().items()}
        state.update({f"text.{k}": v.detach() for k, v in self.comps.text_encoder.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in (("unet.", self.comps.unet), ("text.", self.comps.text_encoder)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def export(self, run: RunDir) -> None:
        """``RUN/model/``: the fine-tuned pipeline as a standard diffusers folder (written to a temp dir, then
        renamed, so a half-written model never looks finished)."""
        final = run.path / MODEL_DIR
        tmp = run.path / f".{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.comps.pipeline(scheduler=self.comps.scheduler).save_pretrained(str(tmp), safe_serialization=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def make_config(preset: str = "paper", **overrides) -> BaselineConfig:
    return make_baseline_config(NAME, PRESETS, preset, **overrides)


def train(source, reference, out, preset: str = "paper", seed: int = 0, *, resume: bool = False,
          progress: bool = False, **overrides) -> Path:
    """Train DreamBooth on the source (``<v1>``) and reference (``<v2>``) folders into run folder ``out``."""
    cfg = make_config(preset, seed=seed, **overrides)
    return run_baseline(DreamBooth, source, reference, out, cfg, resume=resume, progress=progress).path


register(MethodSpec(NAME, BaselineConfig, PRESETS, train, make_config, fixed=("method", "preset"),
                    doc=(__doc__ or "").split("\n")[0]))

__all__ = ["NAME", "PRESETS", "DreamBooth", "MODEL_DIR", "make_config", "train"]
