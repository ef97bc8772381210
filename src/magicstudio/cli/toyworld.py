"""``magicstudio toyworld pretrain | table | samples``: the toy world where identity and style are known by
construction (``magicstudio.data.toyworld``, ``magicstudio.models.toyworld``, ``magicstudio.experiments.toyworld``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .main import app

toyworld_app = typer.Typer(help="The toy world: pretrain its model, personalise held-out people and styles, "
                                "write the Table-1-style comparison.", no_args_is_help=True)
app.add_typer(toyworld_app, name="toyworld")

CACHE = Path("~/.cache/magicstudio/toyworld-pretrain")


@toyworld_app.command("pretrain")
def pretrain(
    work: Path = typer.Option(CACHE, "--work", help="Checkpoints and stage results (resumable)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Where ldm.safetensors and encoders.safetensors go "
                              "(default: the package's assets/toyworld, which load_base('toyworld') reads)."),
    seed: int = typer.Option(0, "--seed"),
    vae_steps: Optional[int] = typer.Option(None, "--vae-steps"),
    ldm_steps: Optional[int] = typer.Option(None, "--ldm-steps"),
    encoder_steps: Optional[int] = typer.Option(None, "--encoder-steps", help="Face and style encoder steps "
                                                "(the identity encoder trains 3x as many)."),
    stage: Optional[List[str]] = typer.Option(None, "--stage", help="Run only these stages: vae, ldm, encoders (repeatable)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Continue the text-to-image stage from this "
                                             "toy-world model file's UNet and text encoder instead of from scratch."),
    ldm_lr: Optional[float] = typer.Option(None, "--ldm-lr", help="Peak learning rate of the text-to-image stage."),
    captions: str = typer.Option("described", "--captions", help="Caption design: described (half of the captions "
                                 "name every attribute; the shipped model) or alt-text (0-2 attributes named)."),
    ldm_head_weight: float = typer.Option(3.0, "--ldm-head-weight", help="Weight head latents 1 + this in the "
                                          "text-to-image loss (0: plain MSE)."),
    offset_noise: float = typer.Option(0.1, "--offset-noise", help="Std of the per-picture, per-channel constant "
                                       "added to the training noise (0: none, the first model)."),
    vae_face_weight: float = typer.Option(8.0, "--vae-face-weight", help="Extra loss weight of face pixels in the "
                                          "autoencoder stage (0: the first model)."),
    vae_from: Optional[Path] = typer.Option(None, "--vae-from", help="Reuse the VAE of this toy-world model file "
                                            "(e.g. the packaged ldm.safetensors) instead of training stage 1."),
    vae_init: Optional[Path] = typer.Option(None, "--vae-init", help="Start stage 1 from the VAE of this toy-world "
                                            "model file (then train --vae-steps more) instead of from scratch."),
) -> None:
    """Train the toy LDM (VAE, then UNet + text encoder) and the toy identity/face/style encoders from scratch
    (about an hour on 2 CPU cores). Re-running resumes."""
    from ..errors import UserError
    from ..experiments.toyworld.pretrain import PretrainConfig, pretrain as run, vae_from as take_vae

    stages = tuple(stage or ("vae", "ldm", "encoders"))
    bad = [s for s in stages if s not in ("vae", "ldm", "encoders")]
    if bad:
        raise UserError(f"unknown stage {bad[0]!r}; use vae, ldm or encoders")
    cfg = PretrainConfig(seed=seed)
    for name, value in (("vae_steps", vae_steps), ("ldm_steps", ldm_steps), ("encoder_steps", encoder_steps)):
        if value is not None:
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
            setattr(cfg, name, value)
    if encoder_steps:
        cfg.identity_encoder_steps = 3 * encoder_steps
    from ..data.toyworld import CAPTIONS

    if captions not in CAPTIONS:
        raise UserError(f"unknown --captions {captions!r}; use {' or '.join(CAPTIONS)}")
    for flag, value in (("--ldm-head-weight", ldm_head_weight), ("--offset-noise", offset_noise),
                        ("--vae-face-weight", vae_face_weight)):
        if not value >= 0:
            raise UserError(f"{flag} must be 0 or more")
    cfg.captions, cfg.ldm_head_weight = captions, ldm_head_weight
    cfg.offset_noise, cfg.vae_face_weight = offset_noise, vae_face_weight
    if init_from is not None:
        cfg.ldm_init = str(init_from.expanduser())
    if ldm_lr is not None:
        if not ldm_lr > 0:
            raise UserError("--ldm-lr must be positive")
        cfg.ldm_lr = ldm_lr
    if vae_init is not None:
        cfg.vae_init = str(vae_init.expanduser())
    if vae_from is not None:
        take_vae(vae_from.expanduser(), work.expanduser())
    summary = run(work.expanduser(), dest.expanduser() if dest else None, cfg, stages=stages)
    typer.echo(f"done in {summary['total_s']} s; files: "
               + ", ".join(str(summary[k]) for k in ("ldm_file", "encoders_file") if k in summary))


@toyworld_app.command("table")
def table(
    out: Path = typer.Option(Path("toyworld-table"), "--out", "-o", help="Experiment folder (resumable)."),
    pairs: Optional[int] = typer.Option(None, "--pairs", help="How many held-out (identity, style) pairs (default: "
                                        "all the toy model never saw; 6 for the first model, 12 after)."),
    methods: str = typer.Option(",".join(("magicapture", "magicapture-no-ar-cp", "dreambooth", "textual-inversion",
                                          "custom-diffusion")), "--methods", help="Comma-separated methods."),
    images: int = typer.Option(8, "--images", help="Generated images per pair and method."),
    steps: int = typer.Option(25, "--steps", help="Sampling steps."),
    guidance: float = typer.Option(5.0, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    quick: bool = typer.Option(False, "--quick/--no-quick", help="A few training steps per method (checks the path, not results)."),
    set_: List[str] = typer.Option([], "--set", metavar="[METHOD.]KEY=VALUE", help="[METHOD.]KEY=VALUE on top of the toy settings, e.g. "
                                   "magicapture.lora_lr=5e-4 (magicapture. covers its ablations; repeatable)."),
) -> None:
    """Personalise held-out toy people and styles with every method through the benchmark harness and write
    table.md (toy-CSIM, toy-Style, attention spill, with spreads) and image grids."""
    from ..errors import UserError
    from ..experiments.bench import parse_set
    from ..experiments.toyworld.table import run_table

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not names:
        raise UserError("--methods is empty")
    if images < 1 or steps < 1:
        raise UserError("--images and --steps must be at least 1")
    summary = run_table(out, pairs, names, images, steps, guidance, seed, quick, extra=parse_set(set_))
    typer.echo((out / "table.md").read_text())
    typer.echo(f"written: {out / 'table.md'}, {out / 'table.json'}, {out / 'grid.png'}, {out / 'grids'}/ "
               f"({summary['total_s']} s)")


@toyworld_app.command("samples")
def samples(
    out: Path = typer.Option(Path("toyworld-samples"), "--out", "-o"),
    n: int = typer.Option(5, "--n", help="Pictures per set."),
) -> None:
    """Write the held-out identity and style sets as prepared folders (what `table` personalises)."""
    from ..data import toyworld as world
    from ..errors import UserError

    if not 1 <= n <= 100:
        raise UserError(f"--n {n}: give between 1 and 100 pictures per set")

    for i in range(len(world.HELD_OUT_IDENTITIES)):
        world.write_concept_set(world.concept_set("identity", i, n), out / f"identity-{i}", "source")
        world.write_concept_set(world.concept_set("style", i, n), out / f"style-{i}", "reference")
        typer.echo(f"identity-{i}: {world.HELD_OUT_IDENTITIES[i].describe()}; "
                   f"style-{i}: {world.HELD_OUT_STYLES[i].describe()}")
    typer.echo(f"written to {out}")


@toyworld_app.command("attributes")
def attributes(
    prompts: int = typer.Option(24, "--prompts", help="Prompts per set (held-in, held-out)."),
    images: int = typer.Option(2, "--images", help="Images per prompt."),
    steps: int = typer.Option(25, "--steps", help="Sampling steps."),
    guidance: float = typer.Option(5.0, "--guidance"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the result as JSON here."),
) -> None:
    """How well the base toy model draws what it is told: prompted with every attribute of a person and a style, the
    share of images in which the toy encoders read each attribute back (held-in and held-out combinations)."""
    from ..errors import UserError
    from ..experiments.toyworld.attributes import attribute_accuracy, markdown
    from ..io import write_json

    if prompts < 1 or images < 1 or steps < 1:
        raise UserError("--prompts, --images and --steps must be at least 1")
    result = attribute_accuracy(prompts, images, steps, guidance, seed)
    if out is not None:
        write_json(out, result)
    typer.echo(markdown(result))
