"""Sampling schedulers by name, all built from the base model's own noise-schedule config."""

from __future__ import annotations

from ..errors import UserError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    kwargs = {}
    if name == "ddim":
        kwargs = {"clip_sample": False, "set_alpha_to_one": False}
    return cls.from_config(config, **kwargs)
