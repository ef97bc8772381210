"""DINO ViT features for MagiCapture's general-object mode (supplement, Eq. 11; after Splice, Tumanyan et al. 2022).

:class:`DinoFeatures` is a frozen ViT, differentiable with respect to its input image, returning the last layer's
``[CLS]`` token (style) and the keys of the last layer's multi-head self-attention (structure: their
self-similarity matrix and patch-wise contrast). Specs: ``None`` -> ``facebook/dino-vitb8`` (Splice's network),
any transformers ViT folder or hub id (e.g. ``facebook/dino-vits16``), or ``"tiny"`` (random, for tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..hub import local_only as _offline

DEFAULT_DINO = "facebook/dino-vitb8"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoFeatures(nn.Module):
    """``forward(images [B, 3, H, W] in [-1, 1]) -> (cls [B, D], keys [B, N, D])`` (keys without the CLS token;
    heads concatenated). Images are resized (bilinear) to the ViT's input size and ImageNet-normalised."""

    def __init__(self, vit: nn.Module, name: str) -> None:
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.name = name
        self.size = int(vit.config.image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        names = [n for n, _ in vit.named_modules() if n.endswith(("attention.k_proj", "attention.attention.key"))]
        if not names:
            raise UserError(f"{name}: no self-attention key projection found (not a ViT?)")
        self._key_module = dict(vit.named_modules())[names[-1]]

    def train(self, mode: bool = True) -> "DinoFeatures":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        captured = {}
        handle = self._key_module.register_forward_hook(lambda m, i, o: captured.__setitem__("keys", o))
        try:
            hidden = self.vit(pixel_values=x.to(self.mean.dtype)).last_hidden_state
        finally:
            handle.remove()
        return hidden[:, 0], captured["keys"][:, 1:]


def tiny_vit_config(image_size: int = 32):
    """A toy ViT of the DINO architecture (random weights: tests)."""
    from transformers import ViTConfig

    return ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=37)


def tiny_dino(seed: int = 0, image_size: int = 32) -> DinoFeatures:
    from transformers import ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = ViTModel(tiny_vit_config(image_size), add_pooling_layer=False)
    return DinoFeatures(vit, f"dino-tiny(seed={seed})")


def load_dino_features(spec: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> DinoFeatures:
    """The DINO ViT of Eq. 11 (see module docstring); one-line ``UserError`` when it cannot be loaded."""
    from transformers import ViTModel

    spec = str(spec or DEFAULT_DINO)
    if spec == "tiny" or spec.startswith("tiny:"):
        return tiny_dino(int(spec.partition(":")[2] or 0)).to(device)
    local = os.path.isdir(os.path.expanduser(spec))
    try:
        vit = ViTModel.from_pretrained(os.path.expanduser(spec) if local else spec, add_pooling_layer=False,
                                       local_files_only=_offline() and not local)
    except Exception as exc:
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise UserError(f"could not load the DINO ViT {spec!r} ({first}); pass --dino-model with a local "
                        f"transformers ViT folder (e.g. a download of {DEFAULT_DINO})") from None
    return DinoFeatures(vit, spec).to(device)
