"""``magicstudio demo``: the whole job in minutes on a CPU: in the toy world (default) or on the bundled photos."""

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


TOY_NOTE = (
    "The demo runs in the toy world (magicstudio toyworld): a small latent diffusion model trained from scratch on "
    "procedural 64x64 portraits, where a held-out person and a held-out style are personalised for real. For real "
    "photos use --model stable-diffusion-v1-5/stable-diffusion-v1-5 (or a local folder / .safetensors file) with "
    "--preset paper on a GPU; `magicstudio demo --world photos` runs the photo path on the random tiny model."
)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("magicstudio-demo"), "--out", "-o", help="Where the demo writes everything."),
    steps: int = typer.Option(0, "--steps", help="Override MagiCapture's total training steps (0: keep)."),
    world: str = typer.Option("toy", "--world", help="toy: the trained toy-world model and a held-out toy person "
                              "and style (default); photos: the bundled photos on the random tiny model."),
) -> None:
    """prepare -> capture train -> generate -> attention maps; then a MagicFace run (toy world by default)."""
    from ..errors import UserError
    from ..io import claim_folder

    if world not in ("toy", "photos"):
        raise UserError(f"unknown --world {world!r}; use toy or photos")
    if steps < 0:
        raise UserError(f"--steps {steps}: must be at least 1 (or 0 to keep the preset's)")
    claim_folder(out, "demo")
    for name in ("run", "generated", "magicface"):  # the demo's own previous output
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    if world == "photos":
        _photos_demo(out, steps)
    else:
        _toy_demo(out, steps)


def _toy_demo(out: Path, steps: int) -> None:
    import numpy as np
    from PIL import Image

    from ..data import toyworld as tw
    from ..evaluation import evaluate_images
    from ..methods.magicapture import make_config, run_training
    from ..training.generate import default_prompt, generate
    from ..experiments.toyworld.table import TOY_SETTINGS, base_images

    typer.echo(TOY_NOTE + "\n")
    person, style = tw.HELD_OUT_IDENTITIES[0], tw.HELD_OUT_STYLES[0]
    typer.echo("1/5 the held-out toy person and style (never seen by the model):")
    typer.echo(f"    person: {person.describe()}\n    style:  {style.describe()}")
    src = tw.write_concept_set(tw.concept_set("identity", 0, 5), out / "prepared" / "source", "source")
    ref = tw.write_concept_set(tw.concept_set("style", 0, 5), out / "prepared" / "reference", "reference")
    typer.echo(f"2/5 5 pictures each, with face/head/person masks from the generator ({src / 'preview.png'}, "
               f"{ref / 'preview.png'})")
    settings = {**TOY_SETTINGS["*"], **TOY_SETTINGS["magicapture"]}
    if steps:
        settings.update(ti_steps=max(1, steps // 4), lora_steps=max(1, steps - steps // 4))
    typer.echo(f"3/5 training MagiCapture on the toy model ({settings['ti_steps']} textual-inversion + "
               f"{settings['lora_steps']} LoRA steps: composed prompts, identity loss, Attention Refocusing) ...")
    run = run_training(src, ref, out / "run", make_config("smoke", **settings))
    typer.echo("4/5 generating 'a photo of a <v1> person in the style of <v2>' with <v1>/<v2> attention maps ...")
    maps: list = []
    paths = generate(run.path, out / "generated", num_images=4, steps=25, guidance=5.0, save_attention=True,
                     attention_maps=maps)
    scores = evaluate_images(paths, src, ref, metrics=["csim", "style"], face_backend="toyworld", clip_model="toyworld")
    base = base_images(out / "base", 4, steps=25, guidance=5.0)
    base_scores = evaluate_images(base, src, ref, metrics=["csim", "style"], face_backend="toyworld",
                                  clip_model="toyworld")
    for name, rep in (("personalised", scores), ("base model", base_scores)):
        s = rep["summary"]
        typer.echo(f"    {name:>12}: toy-CSIM {s['csim']['mean']:.3f}, toy-Style {s['style']['mean']:.3f}")
    from . import demo_figures as fig

    fig.overview(sorted((src / "images").glob("*.png"))[:4], sorted((ref / "images").glob("*.png"))[:4], base, paths,
                 person=person.describe(), style=style.describe(), base_prompt="a photo of a person",
                 prompt=default_prompt(run.read_config()), base_summary=base_scores["summary"],
                 summary=scores["summary"]).save(out / "overview.png")
    face = tw.canonical_portrait().masks["face"]
    picture, shares = fig.attention(paths, maps, run.read_config()["tokens"], face)
    picture.save(out / "attention.png")
    mean = np.nanmean(np.array(shares), axis=0)
    typer.echo(f"    attention on the face: <v1> {mean[0]:.0%}, <v2> {mean[1]:.0%} (the face is "
               f"{float((face > 0).mean()):.0%} of the picture; attention.png)")
    typer.echo("5/5 MagicFace (training-free): the toy person's face with another person's hair, RSA then RBA ...")
    from ..methods.magicface import run_magicface

    hair_dir = out / "magicface-inputs"
    hair_dir.mkdir(parents=True, exist_ok=True)
    donor = tw.render(tw.HELD_OUT_IDENTITIES[1], tw.HELD_OUT_STYLES[1], np.random.default_rng(1))
    Image.fromarray(donor.image).save(hair_dir / "donor.png")
    Image.fromarray(np.where(donor.masks["face"] > 0, 0, donor.masks["head"]).astype(np.uint8)).save(hair_dir / "hair.png")
    face_ref = (src / "images" / "source-00.png", src / "masks" / "face" / "source-00.png")
    mf_prompt = "a photo of a person with hair"
    face_paths = run_magicface([f"person={face_ref[0]}:{face_ref[1]}", f"hair={hair_dir / 'donor.png'}:{hair_dir / 'hair.png'}"],
                               mf_prompt, out / "magicface", model="toyworld", steps=25, guidance=5.0, save_masks=True)
    last = [max((out / "magicface" / "masks" / p.stem).glob("step*.png"), default=None) for p in face_paths]
    fig.magicface([("person", *face_ref), ("hair", hair_dir / "donor.png", hair_dir / "hair.png")], face_paths, last,
                  mf_prompt).save(out / "magicface.png")
    typer.echo("")
    typer.echo(f"done. Everything is in {out.resolve()}:")
    typer.echo("  overview.png             the person and the style (top); the base model and MagiCapture (bottom), scored")
    typer.echo("  attention.png            where <v1> and <v2> look in each generated image (face outlined)")
    typer.echo("  magicface.png            MagicFace's references, result and segmentation")
    typer.echo("  prepared/*/preview.png   the toy photos with their masks")
    typer.echo("  run/                     LoRA, embeddings, A1111 exports, metrics.jsonl, samples/")
    typer.echo(f"  generated/               {len(paths)} images and their attention maps")
    typer.echo(f"  magicface/               {len(face_paths)} image(s), the references with masks, per-step segmentation")


def _photos_demo(out: Path, steps: int) -> None:
    from ..data.prepare import prepare_folder
    from ..data.samples import make_demo_sets
    from ..methods.magicapture import make_config, run_training
    from ..training.generate import generate

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
    cfg = make_config("smoke", deterministic=True, **overrides)  # pinned: the same figures on every CPU
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
