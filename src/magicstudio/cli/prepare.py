"""``magicstudio prepare``: crop photos and compute their masks into a prepared folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .main import app


@app.command("prepare")
def prepare(
    input_dir: Path = typer.Argument(..., help="Folder of photos (jpg, png, webp, tiff, ...)."),
    role: str = typer.Option(..., "--role", "-r", help="source: photos of the person; reference: photos of the style."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (images/, masks/, manifest.json, preview.png)."),
    size: int = typer.Option(512, "--size", help="Side of the square output images (multiple of 8, 64-2048)."),
    masks: Optional[Path] = typer.Option(
        None, "--masks",
        help="Folder of your own masks: <stem>.png or face|head|person/<stem>.png, same size as each photo."),
    subject: str = typer.Option(
        "person", "--subject",
        help="person, or object (source role: the mask to train in is the object's foreground, from --masks or "
             "the person segmentation; no face needed)."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", "-q", help="Print only errors."),
) -> None:
    """Crop photos (source: square around the face; reference: centre crop) and compute face/head/person masks."""
    from ..data.prepare import prepare_folder  # validates role, size and folders before any work

    report = prepare_folder(input_dir, role, out, size=size, masks_dir=masks, progress=not quiet,
                            subject=subject)
    if not quiet:
        typer.echo(f"kept {len(report.items)} {role} photo(s), rejected {len(report.rejected)} -> {report.out_dir}")
        for r in report.rejected:
            typer.echo(f"  rejected {Path(r.path).name}: {r.reason}")
        for item in report.items:
            for warning in item.warnings:
                typer.echo(f"  warning {Path(item.source).name}: {warning}")
        for warning in report.warnings:
            typer.echo(f"  warning: {warning}")
        if report.preview is not None:
            typer.echo(f"check the crops and masks in {report.preview}")
    if not report.items:
        raise UserError(
            f"no usable {role} photos in {input_dir} ({len(report.rejected)} rejected; reasons in {report.manifest})")
