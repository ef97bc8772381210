"""The settings every personalisation method shares, and how a method's settings are built from a preset.

``TrainConfig`` holds the fields the training layer reads (base model, size, seed, the two placeholder tokens,
optimisation, precision, augmentation, checkpoints and logging); a method's dataclass extends it with its own
fields and may give a shared field another default by declaring it again. ``build_config`` is the one way a
config is made: the preset over the defaults, then the caller's settings (None values ignored), each checked by
name and type (one line naming the key and the accepted ones).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import UserError
from ..models.base import SD15


#: learning-rate schedules within a phase (names of diffusers' get_scheduler)
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    preset: str = "paper"
    model: str = SD15
    resolution: int | None = None  # None: the base model's native size
    seed: int = 0
    mode: str = "portrait"  # generate's default prompt reads it (the run-folder contract)
    # tokens: <v1> identity (source images), <v2> style (reference images)
    v1: str = "<v1>"
    v2: str = "<v2>"
    v1_init: str = "person"
    v2_init: str = "style"
    # optimisation
    grad_accum: int = 1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    lr_schedule: str = "constant"  # one of LR_SCHEDULES, within each phase (diffusers' get_scheduler)
    lr_warmup_steps: int = 0  # linear warm-up at the start of each phase
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    deterministic: bool = False  # True: one intra-op thread on CPU, so the same seed gives identical weights (slower: all cores by default)
    # data augmentation
    hflip: bool = True
    color_jitter: float = 0.0
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list = field(default_factory=list)  # the sample grids' prompts, one row each; []: the composed prompt
    sample_steps: int = 25
    log_every: int = 1

    def tokens(self) -> list[str]:
        return [self.v1, self.v2]

    @property
    def total_steps(self) -> int:
        raise NotImplementedError


def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The accepted Python types of each field of the dataclass ``cls`` (``int | None`` -> (int, NoneType));
    fields of other types (lists ...) are left out."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
        if all(k in (int, float, str, bool, type(None)) for k in kinds):
            out[f.name] = tuple(kinds)
    return out


def fits(value: Any, kinds: tuple[type, ...]) -> bool:
    """Whether ``value`` is of one of ``kinds`` (an int is a float; a bool is not an int)."""
    if value is None:
        return type(None) in kinds
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    return isinstance(value, str) and str in kinds


def type_names(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def check_settings(cls: type, settings: dict, what: str = "setting", fixed: tuple[str, ...] = ()) -> None:
    """One line for the first unknown key or value of the wrong type in ``settings`` (None: keep the default)."""
    names = [f.name for f in fields(cls) if f.name not in fixed]
    for key, value in settings.items():
        if key not in names:
            raise UserError(f"unknown {what} {key!r}; accepted: {', '.join(names)}")
        kinds = field_types(cls).get(key)
        if value is not None and kinds and not fits(value, kinds):
            raise UserError(f"{what} {key}={value!r}: expected {type_names(kinds)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{what} {key}={value!r}: must be a finite number")


def coerce(cls: type, settings: dict) -> dict:
    """ints given for float fields become floats (YAML's ``1`` for ``lr``), so the dataclass holds its types."""
    types = field_types(cls)
    return {k: float(v) if (isinstance(v, int) and not isinstance(v, bool) and types.get(k) and int not in types[k]
                            and float in types[k]) else v for k, v in settings.items()}


def build_config(cls: type, presets: dict[str, dict], preset: str, overrides: dict, what: str = "setting",
                 fixed: dict | None = None):
    """``cls()`` with ``presets[preset]`` and ``fixed`` (set by the method itself, e.g. its name) over the
    defaults, then ``overrides`` (None values ignored), each checked by name and type."""
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    fixed = dict(fixed or {})
    check_settings(cls, overrides, what, tuple(fixed))
    cfg = replace(cls(), preset=preset, **fixed, **presets[preset])
    cfg = replace(cfg, **coerce(cls, {k: v for k, v in overrides.items() if v is not None}))
    if getattr(cfg, "lr_schedule", "constant") not in LR_SCHEDULES:
        raise UserError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if getattr(cfg, "lr_warmup_steps", 0) < 0:
        raise UserError(f"lr_warmup_steps must be >= 0, not {cfg.lr_warmup_steps}")
    for name, least in (("sample_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 1), ("sample_steps", 1),
                        ("log_every", 1), ("lora_rank", 1), ("grad_accum", 1)):
        value = getattr(cfg, name, least)
        if isinstance(value, int) and value < least:
            raise UserError(f"{name} must be at least {least}, not {value}")
    if not all(isinstance(p, str) and p.strip() for p in getattr(cfg, "sample_prompts", [])):
        raise UserError("sample_prompts must be a list of non-empty prompts")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Settings from the command line: --config FILE and --set KEY=VALUE
# --------------------------------------------------------------------------------------------------------------

#: keys a run's config.yaml records beside the settings (its inputs and outputs), not settings themselves
RUN_RECORD_KEYS = ("source", "reference", "source_sha256", "reference_sha256", "tokens", "method", "model_dir")


def parse_value(text: str):
    """``10`` -> int, ``1e-4`` -> float (YAML would keep it a string), ``true``/``null``/lists via YAML."""
    import yaml

    text = text.strip()
    if not text:
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: list[str] | None) -> dict:
    """``["lora_lr=1e-4", "use_ar=false"]`` -> ``{"lora_lr": 0.0001, "use_ar": False}`` (``--set``, repeatable)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. lora_lr=1e-4")
        out[key.strip()] = parse_value(value)
    return out


def read_settings_file(path) -> dict:
    """The settings in a YAML or TOML file (``--config``): e.g. the ``config.yaml`` a run wrote, so a run can be
    repeated. Returns a flat dict; the run-record keys (``RUN_RECORD_KEYS``) are kept for the caller to use."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: cannot be read ({exc.__class__.__name__})") from None
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise UserError(f"--config {path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'} ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected KEY: VALUE settings, found {type(data).__name__}")
    return data
