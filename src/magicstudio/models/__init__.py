"""Models: loading SD components, the tiny model, placeholder tokens, face/CLIP/DINO encoders."""

from .base import load_base
from .components import Components

__all__ = ["load_base", "Components"]
