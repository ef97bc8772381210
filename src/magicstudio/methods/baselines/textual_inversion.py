"""Textual Inversion (Gal et al. 2022, arXiv 2208.01618) as MagiCapture's paper ran it as a baseline.

Only the embeddings of ``<v1>`` (identity, from the source images) and ``<v2>`` (style, from the reference
images) train; the UNet, the VAE and every other row of the text encoder stay frozen. Paper supplement:
batch 2 (one source + one reference image), lr 5e-3, 5000 steps, sampling with 50 steps at guidance 7.5.
Following the original method: initial embeddings from a coarse word for each concept ("person", "style"), a
random prompt template per example, plain denoising loss, AdamW with weight decay 0.01 (the original's
``torch.optim.AdamW`` at its default decay, on the embedding rows only), constant lr, no clipping.

The run folder holds the two embeddings (``embeddings/``, plus A1111 copies) and no LoRA.
"""

from __future__ import annotations

from pathlib import Path

from ...training.runs import RunDir
from ...training.loop import Phase
from ...training.registry import MethodSpec, register
from .common import Baseline, BaselineConfig, make_baseline_config, run_baseline

NAME = "textual-inversion"

PRESETS: dict[str, dict] = {
    "paper": dict(steps=5000, lr=5e-3, templates="varied", v1_init="person", v2_init="style", weight_decay=1e-2,
                  grad_clip=None, checkpoint_every=500, keep_checkpoints=2),
    "smoke": dict(model="tiny", steps=40, lr=5e-2, templates="varied", v1_init="person", v2_init="style",
                  weight_decay=1e-2, grad_clip=None, checkpoint_every=20, sample_steps=5),
}


class TextualInversion(Baseline):
    wrap_tokens = True

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [Phase("textual_inversion", cfg.steps, self._setup, cfg.lr_schedule, cfg.weight_decay, cfg.grad_clip,
                      cfg.lr_warmup_steps)]

    def _setup(self) -> list[dict]:
        return [{"params": [self.embedding.rows], "lr": self.cfg.lr}]

    def export(self, run: RunDir) -> None:
        from ...training.export import export_a1111

        self.save_tokens(run)
        export_a1111(run.path)


def make_config(preset: str = "paper", **overrides) -> BaselineConfig:
    return make_baseline_config(NAME, PRESETS, preset, **overrides)


def train(source, reference, out, preset: str = "paper", seed: int = 0, *, resume: bool = False,
          progress: bool = False, **overrides) -> Path:
    """Train Textual Inversion on the source (``<v1>``) and reference (``<v2>``) folders into run folder ``out``."""
    cfg = make_config(preset, seed=seed, **overrides)
    return run_baseline(TextualInversion, source, reference, out, cfg, resume=resume, progress=progress).path


register(MethodSpec(NAME, BaselineConfig, PRESETS, train, make_config, fixed=("method", "preset"),
                    doc=(__doc__ or "").split("\n")[0]))

__all__ = ["NAME", "PRESETS", "TextualInversion", "make_config", "train"]
