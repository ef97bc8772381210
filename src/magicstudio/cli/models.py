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
    from ..models.tiny import write_tiny

    from ..errors import UserError

    marker = out / ".magicstudio-tiny-model"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise UserError(f"--out {out} exists and holds files this command did not write; choose an empty or new "
                        "folder (nothing was changed)")
    if not -2**63 <= seed < 2**63:
        raise UserError(f"--seed {seed} is out of range (|seed| < 2**63)")
    write_tiny(out, seed)
    marker.write_text("written by `magicstudio tiny-model`; it may be written again\n")
    typer.echo(f"wrote the tiny model to {out} (load it with StableDiffusionPipeline.from_pretrained('{out}'))")
