"""``magicstudio tailor train|generate``: MagicTailor from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .main import app

tailor_app = typer.Typer(help="MagicTailor: a concept <v0> with components <v1>, ... taken from other pictures.",
                         no_args_is_help=True)
app.add_typer(tailor_app, name="tailor")


def parse_pair(text: str, flag: str) -> tuple[str, Path]:
    """``person=DIR`` -> ("person", Path(DIR)); a one-line UserError otherwise."""
    from ..errors import UserError

    word, sep, folder = text.partition("=")
    word = word.strip()
    if not sep or not word or not folder.strip() or any(c.isspace() for c in word):
        raise UserError(f"{flag} {text!r}: expected CLASS=FOLDER, e.g. {flag} {'person' if flag == '--concept' else 'hair'}=photos/")
    return word, Path(folder.strip())


def _from_config(settings: dict) -> tuple[tuple[str, Path] | None, list[tuple[str, Path]], dict]:
    """The concept and component folders a run's config.yaml names, and its settings without the record keys."""
    from ..training.config import RUN_RECORD_KEYS

    concept = None
    if settings.get("concept") and settings.get("concept_class"):
        concept = (settings["concept_class"], Path(settings["concept"]))
    words = [w.strip() for w in str(settings.get("component_classes") or "").split(",") if w.strip()]
    components = [(w, Path(settings[f"component_{w}"])) for w in words if settings.get(f"component_{w}")]
    record = set(RUN_RECORD_KEYS) | {"concept", "left_out", "images"}
    rest = {k: v for k, v in settings.items()
            if k not in record and not k.endswith("_sha256") and not k.startswith("component_") or k == "component_classes"}
    return concept, components, rest


@tailor_app.command("train")
def train_cmd(
    concept: Optional[str] = typer.Option(None, "--concept", help="CLASS=FOLDER of the concept's photos, e.g. person=me/ (the class word initialises <v0>)."),
    component: Optional[list[str]] = typer.Option(None, "--component", help="CLASS=FOLDER of a component's photos, e.g. hair=hairstyle/ (repeatable: <v1>, <v2>, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create (or to resume with --resume)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model: SD 2.1-base by default; tiny, a hub id, a diffusers folder or a .safetensors file."),
    preset: Optional[str] = typer.Option(None, "--preset", help="paper | official | smoke (default: the --config file's, else paper)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="User masks: DIR/<stem>.png (the image's own concept or component) or DIR/<class>/<stem>.png, drawn on the original photo."),
    config: Optional[Path] = typer.Option(None, "--config", help="A YAML/TOML file of settings, e.g. a run's config.yaml (repeats that run)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE for any MagicTailor setting (repeatable), e.g. --set lambda_pres=0.1."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    dsbal_steps: Optional[int] = typer.Option(None, "--dsbal-steps"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Warm-up learning rate (warmup_lr)."),
    dsbal_lr: Optional[float] = typer.Option(None, "--dsbal-lr", help="DS-Bal learning rate."),
    no_dmdeg: bool = typer.Option(False, "--no-dmdeg", help="Without DM-Deg (ablation)."),
    no_dsbal: bool = typer.Option(False, "--no-dsbal", help="Without DS-Bal: joint training in the second stage (ablation)."),
    fixed_dmdeg: bool = typer.Option(False, "--fixed-dmdeg", help="DM-Deg at a fixed intensity (ablation)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Training size (default: the model's)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic", help="Bit-identical weights for a seed on CPU (one core)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train MagicTailor (warm-up, then DS-Bal; DM-Deg throughout) into a run folder."""
    from ..errors import UserError
    from ..methods.magictailor import make_config, run_training
    from ..training.config import parse_assignments, read_settings_file

    settings = read_settings_file(config) if config else {}
    conf_concept, conf_components, settings = _from_config(settings)
    picked = parse_pair(concept, "--concept") if concept else conf_concept
    components = [parse_pair(c, "--component") for c in component] if component else conf_components
    if picked is None or not components:
        raise UserError("--concept CLASS=FOLDER and at least one --component CLASS=FOLDER are required "
                        "(or a --config file that names them)")
    preset = preset or settings.pop("preset", None) or "paper"
    settings.pop("preset", None)
    settings.update(parse_assignments(set_))
    flags = dict(model=model, warmup_steps=warmup_steps, dsbal_steps=dsbal_steps, warmup_lr=lr, dsbal_lr=dsbal_lr,
                 resolution=resolution, checkpoint_every=checkpoint_every, seed=seed, deterministic=deterministic,
                 masks_dir=str(masks) if masks else None,
                 use_dmdeg=False if no_dmdeg else None, use_dsbal=False if no_dsbal else None,
                 dmdeg_dynamic=False if fixed_dmdeg else None)
    settings.update({k: v for k, v in flags.items() if v is not None})
    settings.update(concept_class=picked[0], component_classes=",".join(w for w, _ in components))
    cfg = make_config(preset, **settings)
    run = run_training(picked[1], [d for _, d in components], out, cfg, resume=resume, progress=not quiet)
    if not quiet:
        tokens = ", ".join(f"{t} = {w}" for t, w in zip(cfg.tokens(), cfg.class_words()))
        typer.echo(f"run folder: {run.path}  (tokens {tokens}; LoRA: pytorch_lora_weights.safetensors, "
                   f"embeddings/, a1111/, masks-preview.png, metrics.jsonl)")


def check_prompt(prompt: str, tokens: list[str]) -> None:
    """Every token the run learned must be in the prompt (the composition is the point); one line otherwise."""
    from ..errors import UserError

    missing = [t for t in tokens if t not in prompt]
    if missing:
        example = " with ".join(tokens) + ", on the beach"
        raise UserError(f"the prompt does not name {', '.join(missing)} (this run learned {', '.join(tokens)}); "
                        f"e.g. --prompt \"{example}\"")


@tailor_app.command("generate")
def generate_cmd(
    run: Path = typer.Argument(..., help="A finished MagicTailor run folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Default: '<v0> with <v1>' (the run's sample prompt)."),
    negative: str = typer.Option("", "--negative"),
    num_images: int = typer.Option(4, "--num-images", "-n"),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps (the paper: 50)."),
    guidance: float = typer.Option(7.5, "--guidance"),
    scheduler: str = typer.Option("ddim", "--scheduler"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Default: RUN/generated."),
    model: Optional[str] = typer.Option(None, "--model", help="Override the run's base model (same architecture)."),
) -> None:
    """Generate the concept with its components from a trained run, e.g. --prompt "<v0> with <v1>, on the beach"."""
    from ..errors import UserError
    from ..training.generate import generate
    from ..training.runs import RunDir

    rd = RunDir(run)
    if not rd.config_path.is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml)")
    cfg = rd.read_config()
    if "dsbal_steps" not in cfg:
        raise UserError(f"{run} is not a MagicTailor run; use 'magicstudio capture generate' for MagiCapture runs")
    tokens = list(cfg.get("tokens") or [])
    prompt = prompt if prompt is not None else str(cfg.get("sample_prompt", "{v0} with {v1}")).format(
        **{f"v{i}": t for i, t in enumerate(tokens)})
    check_prompt(prompt, tokens)
    paths = generate(run, out, prompt, negative, num_images, seed, steps, guidance, scheduler, model=model)
    typer.echo(f"wrote {len(paths)} image(s) to {paths[0].parent}")
