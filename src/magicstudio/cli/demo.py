"""``magicstudio demo``: the whole job on the built-in tiny model and the bundled photos, in minutes on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from .main import app

TINY_NOTE = (
    "Note: the demo runs on the built-in 'tiny' model, which has Stable Diffusion 1.5's architecture but random "
    "weights: its images are meaningless by design. For real portraits run the same commands with "
    "--model stable-diffusion-v1-5/stable-diffusion-v1-5 (or a local diffusers folder / .safetensors file) and "
    "--preset paper on a GPU, and --face-encoder with ArcFace weights (backbone.pth) for the identity loss."
)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("magicstudio-demo"), "--out", "-o", help="Where the demo writes everything."),
    steps: int = typer.Option(0, "--steps", help="Override the smoke preset's total steps (0: keep)."),
) -> None:
    """prepare -> capture train (smoke, tiny model) -> generate -> attention maps; then a MagicFace run."""
    from ..data.prepare import prepare_folder
    from ..data.samples import make_demo_sets
    from ..methods.magicapture import make_config, run_training
    from ..methods.magicapture.generate import generate

    if (out / "run").exists():
        shutil.rmtree(out / "run")  # the demo's own previous output, nothing a user made
    typer.echo(TINY_NOTE + "\n")
    typer.echo("1/5 making sample photo sets from the bundled public-domain portraits ...")
    src_raw, ref_raw = make_demo_sets(out / "photos")
    typer.echo("2/5 preparing: face crops, face/head/person masks, previews ...")
    src = prepare_folder(src_raw, "source", out / "prepared" / "source", size=256, progress=False)
    ref = prepare_folder(ref_raw, "reference", out / "prepared" / "reference", size=256, progress=False)
    typer.echo(f"    source: {len(src.items)} images (preview {src.preview}); reference: {len(ref.items)} images")
    typer.echo("3/5 training MagiCapture (smoke preset: textual inversion, then LoRA with composed prompts, "
               "identity and Attention Refocusing losses) ...")
    overrides = {}
    if steps:
        overrides = dict(ti_steps=max(1, steps // 5), lora_steps=max(1, steps - steps // 5))
    cfg = make_config("smoke", **overrides)
    run = run_training(out / "prepared" / "source", out / "prepared" / "reference", out / "run", cfg)
    typer.echo("4/5 generating with the composed prompt and saving <v1>/<v2> attention maps ...")
    paths = generate(run.path, out / "generated", num_images=2, steps=20, save_attention=True)
    typer.echo("5/5 MagicFace (training-free): a person and a hairstyle from two photos, RSA then RBA ...")
    from ..data.samples import sample_photos
    from ..methods.magicface import run_magicface

    photos = {p.stem: p for p in sample_photos()}
    face_paths = run_magicface([f"woman={photos['astronaut']}", f"hair={photos['grace_hopper']}"],
                               "a photo of a woman with hair, studio portrait", out / "magicface", model="tiny",
                               steps=20, save_masks=True)
    typer.echo("")
    typer.echo(f"done. Everything is in {out.resolve()}:")
    typer.echo("  prepared/*/preview.png   photos with their masks")
    typer.echo("  run/                     LoRA, embeddings, A1111 exports, metrics.jsonl, samples/")
    typer.echo(f"  generated/               {len(paths)} images and their attention maps")
    typer.echo(f"  magicface/               {len(face_paths)} image(s), the references with masks, per-step segmentation")
    typer.echo(TINY_NOTE)
