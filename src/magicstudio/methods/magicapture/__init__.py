"""MagiCapture: two-phase personalisation of identity ``<v1>`` and style ``<v2>`` (arXiv 2309.06895).

``run_training`` is the whole job as the CLI and the demo use it: prepare the photo folders (cached), load
the base model and the face encoder, then train into a run folder. ``generate`` samples from a finished run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from ...errors import UserError
from ..runs import RunDir
from .config import CaptureConfig, make_config

log = logging.getLogger(__name__)


def prepared_dir(folder: str | Path, role: str, cache_root: Path, size: int, progress: bool = True) -> Path:
    """``folder`` itself when ``magicstudio prepare`` made it, else a prepared copy under ``cache_root``."""
    from ...data.prepare import is_prepared, prepare_folder

    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{role} folder not found: {folder}")
    if is_prepared(folder):
        return folder
    out = cache_root / role
    report = prepare_folder(folder, role, out, size=size, progress=progress)
    if not report.items:
        raise UserError(f"no usable {role} image in {folder}: " + "; ".join(f"{r.path}: {r.reason}" for r in report.rejected[:3]))
    for w in report.warnings:
        log.warning("%s: %s", role, w)
    return out


def run_training(source: str | Path, reference: str | Path, out: str | Path, cfg: CaptureConfig, resume: bool = False,
                 progress: bool = True) -> RunDir:
    from ...models.base import load_base
    from ...models.face_encoder import load_face_encoder
    from ..concepts import load_concept
    from ..training import train
    from .train import MagiCapture

    run = RunDir(out)
    if run.is_done():
        if resume:
            print(f"{run.path} has already finished training; nothing to resume.")
            return run
        raise UserError(f"{run.path} holds a finished run; choose another --out (nothing was overwritten)")
    if run.config_path.exists() and not resume:
        raise UserError(f"{run.path} holds an unfinished run; pass --resume to continue it, or choose another --out")
    if resume and run.config_path.exists():
        saved = run.read_config()
        cfg = replace(cfg, **{k: v for k, v in saved.items() if k in asdict(cfg)})  # the run's own settings win
    run.create()
    comps = load_base(cfg.model)
    cfg = replace(cfg, resolution=cfg.resolution or comps.resolution)
    if cfg.resolution % comps.vae_scale:
        raise UserError(f"resolution {cfg.resolution} must be a multiple of {comps.vae_scale}")
    prep_size = max(cfg.resolution, 512)
    src_dir = prepared_dir(source, "source", run.path / "prepared", prep_size, progress)
    ref_dir = prepared_dir(reference, "reference", run.path / "prepared", prep_size, progress)
    source_set = load_concept(src_dir, cfg.resolution)
    reference_set = load_concept(ref_dir, cfg.resolution)
    encoder = load_face_encoder(cfg.face_encoder) if (cfg.use_id and cfg.mode == "portrait") else None
    run.write_config(asdict(cfg) | {"source": str(source), "reference": str(reference), "tokens": cfg.tokens()})
    from accelerate import PartialState

    device = PartialState().device  # this process's device (GPU i under 'accelerate launch', else CPU)
    if encoder is not None:
        encoder.to(device)
    method = MagiCapture(cfg, comps, source_set, reference_set, encoder, device=device)
    train(method, run, grad_accum=cfg.grad_accum, checkpoint_every=cfg.checkpoint_every,
          keep_checkpoints=cfg.keep_checkpoints, sample_every=cfg.sample_every, resume=resume,
          mixed_precision=cfg.mixed_precision, log_every=cfg.log_every, progress=progress,
          deterministic=cfg.deterministic)
    return run


__all__ = ["CaptureConfig", "make_config", "run_training"]
