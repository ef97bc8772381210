"""The methods MagiCapture's paper compares (Table 1), all trainable the same way.

``METHODS`` maps a method name to ``train(source_dir, reference_dir, out_run_dir, preset, seed, *, resume=False,
progress=False, **overrides) -> run_dir``; every run folder it makes satisfies the run-folder contract
(``training/runs.py``), so ``magicapture.generate.generate`` samples all of them with the composed prompt.

- ``magicapture``: the full method (paper preset: phase 1 TI, phase 2 LoRA + AR + composed prompt + identity).
- ``magicapture-no-ar``: without Attention Refocusing.
- ``magicapture-no-cp``: without composed prompt learning (Table 3 "w/o CP").
- ``magicapture-no-ar-cp``: without both (Table 3 "w/o AR & CP").
- ``dreambooth``, ``textual-inversion``, ``custom-diffusion``: the baselines (one module each).

Presets: ``paper`` (the papers' settings) and ``smoke`` (tiny model, a few dozen steps). ``overrides`` are
settings of the method's config (``MagiCapture``: ``CaptureConfig``; baselines: ``BaselineConfig``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import custom_diffusion, dreambooth, textual_inversion

PRESETS = ("paper", "smoke")


def _magicapture(**switches) -> Callable[..., Path]:
    def train(source, reference, out, preset: str = "paper", seed: int = 0, *, resume: bool = False,
              progress: bool = False, **overrides) -> Path:
        from ..magicapture import make_config, run_training

        cfg = make_config(preset, seed=seed, **{**overrides, **switches})
        return run_training(source, reference, out, cfg, resume=resume, progress=progress).path

    train.__doc__ = f"Train MagiCapture ({', '.join(f'{k}={v}' for k, v in switches.items()) or 'full method'})."
    return train


METHODS: dict[str, Callable[..., Path]] = {
    "magicapture": _magicapture(),
    "magicapture-no-ar": _magicapture(use_ar=False),
    "magicapture-no-cp": _magicapture(use_composed=False),
    "magicapture-no-ar-cp": _magicapture(use_ar=False, use_composed=False),
    dreambooth.NAME: dreambooth.train,
    textual_inversion.NAME: textual_inversion.train,
    custom_diffusion.NAME: custom_diffusion.train,
}

__all__ = ["METHODS", "PRESETS", "custom_diffusion", "dreambooth", "textual_inversion"]
