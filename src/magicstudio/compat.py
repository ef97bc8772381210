"""Library combinations magicstudio knows to break, checked before work starts (one line, never a crash at step N).

transformers 5.24 refuses PEFT < 0.22 in its own adapter methods (``add_adapter``, ``load_adapter``,
``set_adapter``): diffusers' ``load_lora_weights`` goes through them for a text-encoder LoRA. magicstudio's training
injects LoRA with PEFT itself (``training.lora.add_lora``), which has no such check; loading a run whose LoRA has a
text-encoder part into a diffusers pipeline does not, hence ``check_text_encoder_lora``.
"""

from __future__ import annotations

from importlib import metadata

from .errors import UserError


def _version(package: str):
    from packaging.version import Version

    try:
        return Version(metadata.version(package))
    except metadata.PackageNotFoundError:
        return None


def text_encoder_lora_problem() -> str | None:
    """Why a text-encoder LoRA cannot be loaded through transformers/diffusers with the installed versions, or None."""
    from packaging.version import Version

    tf, peft = _version("transformers"), _version("peft")
    if tf is None or peft is None:
        return None
    if tf >= Version("5.24.0.dev0") and peft < Version("0.22.0.dev0"):
        return (f"transformers {tf} needs peft >= 0.22 for text-encoder LoRA, and peft {peft} is installed: "
                "pip install 'transformers<5.24' (or a peft >= 0.22 once released)")
    return None


def check_text_encoder_lora(what: str) -> None:
    """UserError naming the packages and the versions to install when ``what`` needs a text-encoder LoRA that the
    installed transformers/peft pair cannot load."""
    problem = text_encoder_lora_problem()
    if problem:
        raise UserError(f"{what} has a text-encoder LoRA, but {problem}")
