"""``magicstudio tiny-model``: write the built-in tiny model as a standard diffusers folder."""

from __future__ import annotations

from pathlib import Path

import typer

from .main import app


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (model_index.json, unet/, vae/, ...)."),
    seed: int = typer.Option(0, "--seed", help="Weights are drawn from this seed."),
) -> None:
    """Write the tiny random-weight SD 1.5-architecture model; every --model option accepts the folder."""
    from ..io import claim_folder
    from ..training.personalize import check_seed
    from ..models.tiny import write_tiny

    check_seed(seed)
    write_tiny(claim_folder(out, "tiny-model"), seed)
    typer.echo(f"wrote the tiny model to {out} (load it with StableDiffusionPipeline.from_pretrained('{out}'))")
