"""``magicstudio face``: MagicFace, training-free multi-concept portraits (arXiv:2408.07433)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .main import app


@app.command("face")
def face(
    concept: List[str] = typer.Option(..., "--concept", "-c", help="word=image.jpg[:mask.png], once per concept; "
                                      "the word must appear in the prompt (face/head/hair/person words get "
                                      "automatic masks)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Target prompt naming every concept word."),
    out: Path = typer.Option(Path("magicface-out"), "--out", "-o", help="Output folder."),
    model: str = typer.Option("tiny", "--model", help="Base model: tiny, a hub id, a diffusers folder or a .safetensors file (SD 1.x / 2.x)."),
    alpha: float = typer.Option(0.4, "--alpha", help="Fraction of the steps with RSA (layout); RBA for the rest."),
    weight: float = typer.Option(3.0, "--weight", help="Logit bonus w of the reference keys inside their masks."),
    num_images: int = typer.Option(1, "--num-images", "-n"),
    seed: int = typer.Option(0, "--seed", help="Image k uses seed + k."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels (default: the model's)."),
    layers: str = typer.Option("up:1+2", "--layers", help="Replaced self-attention layers: up:<factors>, res:<factors>, all, or a regex."),
    save_masks: bool = typer.Option(False, "--save-masks/--no-save-masks", help="Also write the per-step segmentation pictures."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", "-q", help="No progress output."),
) -> None:
    """Put the people and things of reference photos into a prompt, without training (RSA + RBA)."""
    from ..methods.magicface import run_magicface

    paths = run_magicface(concept, prompt, out, model, alpha=alpha, weight=weight, num_images=num_images, seed=seed,
                          steps=steps, guidance=guidance, negative=negative, size=size, layers=layers,
                          save_masks=save_masks, progress=not quiet)
    if not quiet:
        typer.echo(f"wrote {len(paths)} image(s) to {out}" + (" (segmentation: *-masks.png, masks/, references.png)"
                                                              if save_masks else ""))
