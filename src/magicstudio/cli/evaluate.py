"""``magicstudio evaluate``: score generated images (CSIM, Style, Aesthetic, CLIP-T/I, DINO, ...) into a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .main import app


@app.command("evaluate")
def evaluate(
    generated: Path = typer.Option(..., "--generated", "-g", help="Folder of generated images."),
    source: Optional[Path] = typer.Option(
        None, "--source", "-s", help="Photos of the person (raw or a `magicstudio prepare` folder): for CSIM."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", "-r", help="Style images (raw or prepared): for Style, CLIP-I, DINO."),
    prompts: Optional[str] = typer.Option(
        None, "--prompts",
        help="CLIP-T prompts: a .json ({file: prompt} or one string) or .txt file, or a prompt text. "
             "Default: the prompt stored in magicstudio's PNGs."),
    metrics: Optional[str] = typer.Option(
        None, "--metrics", "-m",
        help="Comma-separated, of: csim, face_sim, style, aesthetic, clip_t, clip_i, dino, dreamsim "
             "(default: csim, style, aesthetic, clip_t, clip_i, dino)."),
    face_backend: str = typer.Option(
        "dlib", "--face-backend", help="dlib (offline), arcface:PATH (backbone.pth), insightface:PATH.onnx, or toyworld (the toy world's identity encoder)."),
    clip_model: Optional[str] = typer.Option(
        None, "--clip-model", help="CLIP hub id or folder (default openai/clip-vit-large-patch14), tiny, or toyworld (the toy world's style encoder)."),
    dino_model: Optional[str] = typer.Option(
        None, "--dino-model", help="DINO hub id or folder (default facebook/dino-vits16), or tiny."),
    aesthetic_head: Optional[str] = typer.Option(
        None, "--aesthetic-head", help="LAION aesthetic head file (sac+logos+ava1-l14-linearMSE.pth or "
                                       "sa_0_4_vit_l_14_linear.pth)."),
    training_face_encoder: Optional[str] = typer.Option(
        None, "--training-face-encoder", help="Face encoder used by training's identity loss (warns if CSIM uses it)."),
    out: Path = typer.Option(Path("report.json"), "--out", "-o", help="report.json path; report.md goes next to it (report-2.json/.md, ... when taken)."),
) -> None:
    """Score generated images against the source (identity) and reference (style) images."""
    for flag, folder in (("--generated", generated), ("--source", source), ("--reference", reference)):
        if folder is not None and not folder.exists():
            raise UserError(f"{flag} {folder}: not found")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give the report's file name, e.g. {out / 'report.json'}")
    from ..evaluation import evaluate_images, load_prompts, write_new_report

    prompt_spec = None
    report_files = {out.with_suffix(".json").resolve(), out.with_suffix(".md").resolve()}
    inputs = [Path(x) for x in (prompts, generated, source, reference) if x]
    clash = next((x for x in inputs if x.exists() and x.resolve() in report_files), None)
    if clash is not None:
        raise UserError(f"--out {out} would overwrite the input {clash}; give the report another name")
    if prompts is not None:
        if Path(prompts).is_dir():
            raise UserError(f"--prompts {prompts} is a folder; give a .json / .txt file or the prompt text")
        looks_like_file = prompts.lower().endswith((".json", ".txt")) or Path(prompts).is_file()
        prompt_spec = load_prompts(prompts) if looks_like_file else prompts
    report = evaluate_images(
        generated, source, reference, prompts=prompt_spec, metrics=metrics, face_backend=face_backend,
        clip_model=clip_model, dino_model=dino_model, aesthetic_head=aesthetic_head,
        training_face_encoder=training_face_encoder)
    json_path, md_path = write_new_report(report, out)  # never over a file already there
    for metric, s in report["summary"].items():
        if "error" in s:
            typer.echo(f"{metric:>10}: unavailable: {s['error']}")
        else:
            mean = "-" if s["mean"] is None else f"{s['mean']:.4f}"
            std = "-" if s["std"] is None else f"{s['std']:.4f}"
            typer.echo(f"{metric:>10}: {mean} ± {std}  (n={s['n']}, misses={s['misses']})")
    for warning in report["config"].get("warnings", []):
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"wrote {json_path} and {md_path}")
    if all("error" in s for s in report["summary"].values()):
        raise UserError(f"no metric could be computed (reasons above and in {md_path})")
