"""MagiCapture: two-phase personalisation of identity ``<v1>`` and style ``<v2>`` (arXiv 2309.06895).

``run_training`` is the whole job as the CLI and the demo use it: prepare the photo folders (cached), load
the base model and the face encoder, then train into a run folder. ``generate`` samples from a finished run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...training.registry import MethodSpec, register
from ...training.runs import RunDir
from .config import PRESETS, CaptureConfig, make_config

log = logging.getLogger(__name__)


def run_training(source: str | Path, reference: str | Path, out: str | Path, cfg: CaptureConfig, resume: bool = False,
                 progress: bool = True) -> RunDir:
    from ...models.face_encoder import load_face_encoder
    from ...training.job import run_method
    from .train import MagiCapture

    if cfg.text_lora:
        from ...compat import text_encoder_lora_problem

        problem = text_encoder_lora_problem()
        if problem:  # training injects the LoRA with PEFT itself and works; loading the result in diffusers does not
            log.warning("this run trains a text-encoder LoRA that diffusers cannot load with these versions: %s", problem)

    def setup(run, cfg, comps, source_set, reference_set, device):
        encoder = load_face_encoder(cfg.face_encoder) if (cfg.use_id and cfg.mode == "portrait") else None
        if encoder is not None:
            encoder.to(device)
        return lambda: MagiCapture(cfg, comps, source_set, reference_set, encoder, device=device), {}

    return run_method(source, reference, out, cfg, setup, resume=resume, progress=progress)


def _entry(name: str, doc: str, **switches) -> MethodSpec:
    def train(source, reference, out, preset: str = "paper", seed: int = 0, *, resume: bool = False,
              progress: bool = False, **overrides) -> Path:
        cfg = make_config(preset, seed=seed, **{**overrides, **switches})  # the ablation's switches win
        return run_training(source, reference, out, cfg, resume=resume, progress=progress).path

    train.__doc__ = f"Train MagiCapture ({doc})."
    return register(MethodSpec(name, CaptureConfig, PRESETS, train,
                               lambda preset="paper", **kw: make_config(preset, **{**kw, **switches}),
                               family="magicapture", switches=switches, doc=doc))


#: the full method and the ablations of the paper's Table 3
_entry("magicapture", "full method")
_entry("magicapture-no-ar", "without Attention Refocusing", use_ar=False)
_entry("magicapture-no-cp", "without composed prompt learning, Table 3 'w/o CP'", use_composed=False)
_entry("magicapture-no-ar-cp", "without both, Table 3 'w/o AR & CP'", use_ar=False, use_composed=False)

__all__ = ["CaptureConfig", "make_config", "run_training"]
