"""MagiCapture: two-phase personalisation of identity ``<v1>`` and style ``<v2>`` (arXiv 2309.06895).

``run_training`` is the whole job as the CLI and the demo use it: prepare the photo folders (cached), load
the base model and the face encoder, then train into a run folder. ``generate`` samples from a finished run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from ..personalize import prepared_dir  # noqa: F401  (re-exported: part of this module's API)
from ..runs import RunDir
from .config import CaptureConfig, make_config

log = logging.getLogger(__name__)


def run_training(source: str | Path, reference: str | Path, out: str | Path, cfg: CaptureConfig, resume: bool = False,
                 progress: bool = True) -> RunDir:
    from ...models.face_encoder import load_face_encoder
    from ..distributed import is_main_process, open_run_everywhere
    from ..personalize import open_run, process_device
    from ..training import train
    from .train import MagiCapture

    if cfg.text_lora:
        from ...compat import text_encoder_lora_problem

        problem = text_encoder_lora_problem()
        if problem:  # training injects the LoRA with PEFT itself and works; loading the result in diffusers does not
            log.warning("this run trains a text-encoder LoRA that diffusers cannot load with these versions: %s", problem)
    opened = open_run_everywhere(open_run, source, reference, out, cfg, resume, progress)
    if opened is None:
        return RunDir(out)
    run, cfg, comps, source_set, reference_set = opened
    encoder = load_face_encoder(cfg.face_encoder) if (cfg.use_id and cfg.mode == "portrait") else None
    if is_main_process():
        run.write_config(asdict(cfg) | {"source": str(source), "reference": str(reference), "tokens": cfg.tokens()})
    device = process_device()
    if encoder is not None:
        encoder.to(device)
    method = MagiCapture(cfg, comps, source_set, reference_set, encoder, device=device)
    train(method, run, grad_accum=cfg.grad_accum, checkpoint_every=cfg.checkpoint_every,
          keep_checkpoints=cfg.keep_checkpoints, sample_every=cfg.sample_every, resume=resume,
          mixed_precision=cfg.mixed_precision, log_every=cfg.log_every, progress=progress,
          deterministic=cfg.deterministic)
    return run


__all__ = ["CaptureConfig", "make_config", "prepared_dir", "run_training"]
