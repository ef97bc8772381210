"""``magicstudio capture train|generate``: MagiCapture from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .main import app

capture_app = typer.Typer(help="MagiCapture: learn a person <v1> and a style <v2>, then compose them.", no_args_is_help=True)
app.add_typer(capture_app, name="capture")


@capture_app.command("train")
def train_cmd(
    source: Optional[Path] = typer.Option(None, "--source", help="Folder of 4-6 photos of the person (raw, or made by 'prepare'); default: the --config file's."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Folder of 4-6 photos of the style (raw or prepared); default: the --config file's."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (or to resume with --resume)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model: tiny, a hub id, a diffusers folder or a .safetensors file."),
    preset: Optional[str] = typer.Option(None, "--preset", help="paper | official | smoke (default: the --config file's, else paper)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A YAML/TOML file of settings, e.g. a run's config.yaml (repeats that run); --set and the flags below win over it."),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="KEY=VALUE for any MagiCapture setting (repeatable), e.g. --set lambda_attn=1.0; the typed flags win over it."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Phase-2 LoRA learning rate (lora_lr)."),
    ti_lr: Optional[float] = typer.Option(None, "--ti-lr", help="Phase-1 textual-inversion learning rate."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank (lora_alpha follows it unless set)."),
    lambda_attn: Optional[float] = typer.Option(None, "--lambda-attn", help="Weight of the Attention Refocusing loss (Eq. 10)."),
    lambda_id: Optional[float] = typer.Option(None, "--lambda-id", help="Weight of the identity loss (Eq. 10)."),
    ti_steps: Optional[int] = typer.Option(None, "--ti-steps", help="Phase 1 (textual inversion) steps."),
    lora_steps: Optional[int] = typer.Option(None, "--lora-steps", help="Phase 2 (LoRA) steps."),
    ar: Optional[bool] = typer.Option(None, "--ar/--no-ar", help="The Attention Refocusing loss (--no-ar: the ablation)."),
    composed: Optional[bool] = typer.Option(None, "--composed/--no-composed", help="Composed prompt learning (--no-composed: the ablation)."),
    identity: Optional[bool] = typer.Option(None, "--id/--no-id", help="The identity loss (--no-id: without it)."),
    face_encoder: Optional[str] = typer.Option(None, "--face-encoder", help="ArcFace weights (backbone.pth or .safetensors) for the identity loss."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Training size (default: the model's)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="portrait, or object (the supplement's general-object variant)."),
    object_class: Optional[str] = typer.Option(None, "--object-class", help="Object mode: the class word (e.g. vase)."),
    dino_model: Optional[str] = typer.Option(None, "--dino-model", help="Object mode: DINO ViT for the structure/style losses (Eq. 11), e.g. facebook/dino-vitb8."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no | fp16 | bf16."),
    decode_precision: Optional[str] = typer.Option(None, "--decode-precision", help="The frozen VAE decoder in the identity / structure losses: auto (bf16 where the device computes it natively) | fp32 | bf16 | fp16."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute the UNet's activations in backward (less memory, slower)."),
    cache_latents: Optional[bool] = typer.Option(None, "--cache-latents/--no-cache-latents", help="Encode images once (turns colour jitter off)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps (Ctrl-C also writes one)."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Write a sample grid every N steps to RUN/samples/ and TensorBoard (0: only at the end)."),
    sample_prompt: Optional[list[str]] = typer.Option(None, "--sample-prompt", metavar="PROMPT", help="A prompt of the sample grids, one row each (repeatable; default: the composed prompt)."),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue the run in --out from its latest checkpoint."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", help="Bit-identical weights for a seed on CPU (also across --resume) by training on one core; default: every core (about 1.65x faster on 2 cores)."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", "-q", help="No progress output."),
) -> None:
    """Train MagiCapture (phase 1 textual inversion, phase 2 LoRA + embeddings) into a run folder."""
    from ..errors import UserError
    from ..methods.magicapture import make_config, run_training
    from ..training.config import RUN_RECORD_KEYS, parse_assignments, read_settings_file

    settings = read_settings_file(config) if config else {}
    source = source or (Path(settings["source"]) if settings.get("source") else None)
    reference = reference or (Path(settings["reference"]) if settings.get("reference") else None)
    if source is None or reference is None:
        raise UserError("--source and --reference are required (or a --config file that names them)")
    if lora_rank is not None and "lora_alpha" not in settings:
        settings["lora_alpha"] = float(lora_rank)  # alpha = rank, as the presets have it
    settings = {k: v for k, v in settings.items() if k not in RUN_RECORD_KEYS}
    preset = preset or settings.pop("preset", None) or "paper"
    settings.pop("preset", None)
    settings.update(parse_assignments(set_))
    overrides = dict(settings)
    flags = dict(model=model, ti_steps=ti_steps, lora_steps=lora_steps, face_encoder=face_encoder,
                 resolution=resolution, mode=mode, mixed_precision=mixed_precision, decode_precision=decode_precision,
                 seed=seed, checkpoint_every=checkpoint_every, object_class=object_class, dino_model=dino_model,
                 deterministic=deterministic, lora_lr=lr, ti_lr=ti_lr, lora_rank=lora_rank, lambda_attn=lambda_attn,
                 lambda_id=lambda_id, use_ar=ar, use_composed=composed, use_id=identity,
                 gradient_checkpointing=gradient_checkpointing, cache_latents=cache_latents, sample_every=sample_every,
                 sample_prompts=list(sample_prompt) if sample_prompt else None)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg = make_config(preset, **overrides)
    from ..training.feedback import TrainingInterrupted
    from .main import interrupted

    try:
        run = run_training(source, reference, out, cfg, resume=resume, progress=not quiet)
    except TrainingInterrupted as exc:
        raise interrupted(exc) from None
    if not quiet:
        lora = "LoRA: pytorch_lora_weights.safetensors, " if (run.path / "pytorch_lora_weights.safetensors").is_file() else ""
        typer.echo(f"run folder: {run.path}  ({lora}tokens: embeddings/, A1111/ComfyUI: a1111/, metrics: metrics.jsonl)")


@capture_app.command("generate")
def generate_cmd(
    run: Path = typer.Argument(..., help="A finished run folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Default: 'a photo of a <v1> person in the style of <v2>'."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    num_images: int = typer.Option(4, "--num-images", "-n"),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(50, "--steps"),
    guidance: float = typer.Option(7.5, "--guidance"),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim, euler_a, euler, dpmpp_2m or pndm."),
    save_attention: bool = typer.Option(False, "--save-attention/--no-save-attention", help="Also write <v1>/<v2> attention heatmaps."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Default: RUN/generated."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the run's base model (same architecture)."),
    upscale: int = typer.Option(0, "--upscale", help="Also write a post-processed copy upscaled by 2 or 4 (0: off)."),
    sr: str = typer.Option("auto", "--sr", help="Super-resolution: auto (Real-ESRGAN when installed, else Lanczos), realesrgan (magicstudio[upscale]) or lanczos."),
    restore_weights: Optional[str] = typer.Option(None, "--restore-weights", help="CodeFormer/GFPGAN weights for face restoration."),
    fidelity: float = typer.Option(0.5, "--fidelity", help="CodeFormer fidelity w (0: quality, 1: fidelity)."),
) -> None:
    """Generate portraits from a trained run (PNG files carry their parameters, A1111-style)."""
    from ..training.generate import generate

    if upscale not in (0, 1, 2, 3, 4):
        from ..errors import UserError

        raise UserError("--upscale must be 0 (off), 2, 3 or 4")
    paths = generate(run, out, prompt, negative, num_images, seed, steps, guidance, scheduler, save_attention,
                     model=model, upscale=upscale, sr=sr, restore_weights=restore_weights, fidelity=fidelity)
    typer.echo(f"wrote {len(paths)} image(s) to {paths[0].parent}")
