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
    source: Path = typer.Option(..., "--source", help="Folder of 4-6 photos of the person (raw, or made by 'prepare')."),
    reference: Path = typer.Option(..., "--reference", help="Folder of 4-6 photos of the style (raw or prepared)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (or to resume with --resume)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model: tiny, a hub id, a diffusers folder or a .safetensors file."),
    preset: str = typer.Option("paper", "--preset", help="paper | official | smoke."),
    ti_steps: Optional[int] = typer.Option(None, "--ti-steps", help="Phase 1 (textual inversion) steps."),
    lora_steps: Optional[int] = typer.Option(None, "--lora-steps", help="Phase 2 (LoRA) steps."),
    no_ar: bool = typer.Option(False, "--no-ar", help="Without the Attention Refocusing loss (ablation)."),
    no_composed: bool = typer.Option(False, "--no-composed", help="Without composed prompt learning (ablation)."),
    no_id: bool = typer.Option(False, "--no-id", help="Without the identity loss."),
    face_encoder: Optional[str] = typer.Option(None, "--face-encoder", help="ArcFace weights (backbone.pth or .safetensors) for the identity loss."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Training size (default: the model's)."),
    mode: str = typer.Option("portrait", "--mode", help="portrait, or object (the supplement's general-object variant)."),
    object_class: Optional[str] = typer.Option(None, "--object-class", help="Object mode: the class word (e.g. vase)."),
    dino_model: Optional[str] = typer.Option(None, "--dino-model", help="Object mode: DINO ViT for the structure/style losses (Eq. 11), e.g. facebook/dino-vitb8."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no | fp16 | bf16."),
    decode_precision: Optional[str] = typer.Option(None, "--decode-precision", help="The frozen VAE decoder in the identity / structure losses: auto (bf16 where the device computes it natively) | fp32 | bf16 | fp16."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    cache_latents: bool = typer.Option(False, "--cache-latents", help="Encode images once (turns colour jitter off)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", help="Bit-identical weights for a seed on CPU (also across --resume) by training on one core; default: every core (about 1.65x faster on 2 cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train MagiCapture (phase 1 textual inversion, phase 2 LoRA + embeddings) into a run folder."""
    from ..methods.magicapture import make_config, run_training

    overrides = dict(model=model, ti_steps=ti_steps, lora_steps=lora_steps, face_encoder=face_encoder,
                     resolution=resolution, mode=mode, mixed_precision=mixed_precision, decode_precision=decode_precision, seed=seed,
                     checkpoint_every=checkpoint_every, object_class=object_class, dino_model=dino_model,
                     deterministic=deterministic)
    if no_ar:
        overrides["use_ar"] = False
    if no_composed:
        overrides["use_composed"] = False
    if no_id:
        overrides["use_id"] = False
    if gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
    if cache_latents:
        overrides["cache_latents"] = True
    cfg = make_config(preset, **overrides)
    run = run_training(source, reference, out, cfg, resume=resume, progress=not quiet)
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
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim | euler_a | euler | dpmpp_2m | pndm."),
    save_attention: bool = typer.Option(False, "--save-attention", help="Also write <v1>/<v2> attention heatmaps."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Default: RUN/generated."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the run's base model (same architecture)."),
    upscale: int = typer.Option(0, "--upscale", help="Also write a post-processed copy upscaled by 2 or 4 (0: off)."),
    sr: str = typer.Option("realesrgan", "--sr", help="Super-resolution: realesrgan (magicstudio[upscale]) or lanczos."),
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
