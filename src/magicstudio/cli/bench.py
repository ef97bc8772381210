"""``magicstudio bench``: every method on every (identity, style) pair, then a Table-1-style report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .main import app


@app.command("bench")
def bench_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="YAML list of {name?, source: DIR, reference: DIR}."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder (re-run the same command to resume it)."),
    methods: str = typer.Option(",".join(("magicapture", "magicapture-no-ar-cp", "dreambooth", "textual-inversion",
                                          "custom-diffusion")), "--methods",
                                help="Comma-separated registered methods: magicapture, magicapture-no-ar, "
                                     "magicapture-no-cp, magicapture-no-ar-cp, dreambooth, textual-inversion, "
                                     "custom-diffusion."),
    images_per_pair: int = typer.Option(100, "--images-per-pair", "-n", help="Images generated per pair and method."),
    preset: str = typer.Option("paper", "--preset", help="paper, or smoke (tiny model, few steps)."),
    backend: str = typer.Option("local", "--backend", help="local (cells one by one) or ray (cells as Ray tasks)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local one)."),
    seed: int = typer.Option(0, "--seed", help="Training seed; images use seeds SEED..SEED+N-1."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default 50; smoke: 10)."),
    guidance: float = typer.Option(7.5, "--guidance"),
    metrics: str = typer.Option("csim,style,aesthetic", "--metrics", help="Comma-separated evaluation metrics: csim, face_sim, style, aesthetic, clip_t, clip_i, dino, dreamsim."),
    face_backend: str = typer.Option("dlib", "--face-backend", help="CSIM network: dlib, arcface:PATH, insightface:PATH.onnx or toyworld."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP for Style/Aesthetic (hub id or folder)."),
    dino_model: Optional[str] = typer.Option(None, "--dino-model"),
    aesthetic_head: Optional[str] = typer.Option(None, "--aesthetic-head", help="LAION aesthetic head weights."),
    face_encoder: Optional[str] = typer.Option(None, "--face-encoder", help="ArcFace weights for MagiCapture's identity loss."),
    set_: List[str] = typer.Option([], "--set", metavar="[METHOD.]KEY=VALUE", help="[METHOD.]KEY=VALUE training setting, e.g. dreambooth.steps=500 (repeatable)."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", help="Train every cell on one CPU core for bit-identical weights per seed (default: every core)."),
    reevaluate: bool = typer.Option(False, "--reevaluate/--no-reevaluate", help="Evaluate finished cells again (e.g. with other metrics)."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", "-q", help="No progress output."),
) -> None:
    """Train, generate and evaluate each (pair, method) cell, then write report.md/.csv/.png into --out."""
    from ..experiments.bench import BenchSettings, load_pairs, method_settings, parse_set, run_bench
    from ..methods import METHODS

    overrides = parse_set(set_)
    if deterministic is not None:
        overrides.setdefault("*", {}).setdefault("deterministic", deterministic)
    if face_encoder:  # the methods that train with a face encoder (MagiCapture and its ablations)
        for m in [x.strip() for x in methods.split(",") if x.strip() in METHODS]:
            if "face_encoder" in method_settings(m):
                overrides.setdefault(m, {}).setdefault("face_encoder", face_encoder)
    settings = BenchSettings(
        methods=[m.strip() for m in methods.split(",") if m.strip()], images_per_pair=images_per_pair, preset=preset,
        seed=seed, steps=steps, guidance=guidance, metrics=[m.strip() for m in metrics.split(",") if m.strip()],
        face_backend=face_backend,
        eval_options={k: v for k, v in (("clip_model", clip_model), ("dino_model", dino_model),
                                        ("aesthetic_head", aesthetic_head)) if v},
        overrides=overrides)
    result = run_bench(load_pairs(pairs), settings, out, backend=backend, ray_address=ray_address,
                       reevaluate=reevaluate, progress=not quiet)
    failed = result.failed
    typer.echo(f"report: {result.report['markdown']}  ({len(result.cells) - len(failed)}/{len(result.cells)} cells done)")
    if failed:
        typer.secho(f"{len(failed)} cell(s) not finished; see report.md (re-run the same command to retry them)",
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(1)
