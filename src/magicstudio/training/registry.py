"""The methods that train into a run folder, by name: one ``MethodSpec`` each (ablations are entries too).

A method package registers its entries when it is imported (``magicstudio.methods`` imports every peer);
bench, the toy world and the CLI look a method up here and never test its name. Adding a method = its folder
under ``methods/`` + its ``register`` calls + one import line in ``methods/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..errors import UserError


@dataclass
class MethodSpec:
    """``train(source, reference, out, preset="paper", seed=0, *, resume=False, progress=False, **settings)
    -> run folder``; ``make_config(preset, **settings)`` -> a ``config_class`` instance (``switches`` applied)."""

    name: str
    config_class: type
    presets: dict[str, dict]
    train: Callable[..., Path]
    make_config: Callable
    family: str = ""  # the method an ablation belongs to (its own name otherwise): toy-world settings are per family
    switches: dict = field(default_factory=dict)  # the fixed settings that make this entry an ablation
    fixed: tuple[str, ...] = ("preset",)  # config fields the entry sets itself (not settings a user gives)
    doc: str = ""

    def __post_init__(self):
        self.family = self.family or self.name

    def settings(self) -> list[str]:
        """The setting names a user may give this method (``--set``, a config file)."""
        return [f.name for f in fields(self.config_class) if f.name not in self.fixed and f.name not in self.switches]


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def shared_presets() -> list[str]:
    """The presets every registered method has (what a sweep over several methods can use)."""
    names = [set(s.presets) for s in METHODS.values()]
    first = next(iter(METHODS.values())).presets if METHODS else {}
    return [p for p in first if all(p in n for n in names)]
