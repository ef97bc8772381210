"""The LAION aesthetic predictor: a linear or MLP head on L2-normalised CLIP ViT-L/14 image embeddings.

Two published layouts load (as tensor-only pickles or safetensors, via :func:`magicstudio.io.load_tensors`):

- ``sa_0_4_vit_l_14_linear.pth`` (LAION-Aesthetics V1): one ``nn.Linear(768, 1)``, keys ``weight``, ``bias``;
- ``sac+logos+ava1-l14-linearMSE.pth`` (improved predictor V2): ``nn.Sequential`` of
  ``Linear(768,1024), Dropout, Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1)``
  saved as ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7`` (no activations: the published
  model has none, and dropout is inactive at inference).

Score = head(clip_image_embedding / ||clip_image_embedding||), about 1-10 for real photos.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import load_tensors

_LAYER_KEY = re.compile(r"^(?:layers\.)?(\d+)\.(weight|bias)$")


class AestheticHead(nn.Module):
    """A chain of linear layers (no activations), applied to unit-length embeddings."""

    def __init__(self, linears: list[nn.Linear], name: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(linears)
        self.name = name
        self.eval().requires_grad_(False)

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].in_features)

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(embeddings.float(), dim=-1)
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, path: Path, what: str) -> nn.Linear:
    if weight.dim() != 2 or (bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0])):
        raise UserError(f"{path}: {what} has weight {tuple(weight.shape)} and bias "
                        f"{None if bias is None else tuple(bias.shape)}; not a linear layer")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight.data.copy_(weight.float())
    if bias is not None:
        layer.bias.data.copy_(bias.float())
    return layer


def head_from_state(state: dict[str, torch.Tensor], path: str | os.PathLike = "<state>") -> AestheticHead:
    """Build the head from a state dict in either published layout; UserError when it is neither."""
    path = Path(path)
    keys = set(state)
    expected = ("expected `weight`/`bias` (linear head, sa_0_4_vit_l_14_linear.pth) or `layers.N.weight`/"
                "`layers.N.bias` (MLP head, sac+logos+ava1-l14-linearMSE.pth)")
    if keys and keys <= {"weight", "bias"} and "weight" in keys:
        linears = [_linear(state["weight"], state.get("bias"), path, "the linear head")]
    else:
        parsed = {k: _LAYER_KEY.match(k) for k in keys}
        bad = sorted(k for k, m in parsed.items() if m is None)
        if bad or not keys:
            shown = ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "") if bad else "no tensors"
            raise UserError(f"{path} is not a LAION aesthetic head ({expected}; found {shown})")
        indices = sorted({int(m.group(1)) for m in parsed.values() if m is not None})
        prefix = "layers." if any(k.startswith("layers.") for k in keys) else ""
        linears = []
        for i in indices:
            w = state.get(f"{prefix}{i}.weight")
            if w is None:
                raise UserError(f"{path}: layer {i} has a bias but no weight ({expected})")
            linears.append(_linear(w, state.get(f"{prefix}{i}.bias"), path, f"layer {i}"))
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise UserError(f"{path}: layer sizes do not chain ({a.out_features} outputs feed {b.in_features} inputs)")
    if linears[-1].out_features != 1:
        raise UserError(f"{path}: the head ends in {linears[-1].out_features} outputs; an aesthetic head gives 1 score")
    return AestheticHead(linears, name=path.name)


def load_aesthetic_head(path: str | os.PathLike, embed_dim: int | None = None) -> AestheticHead:
    """Load a LAION aesthetic head file; ``embed_dim`` (the CLIP model's) is checked against the head's input."""
    state = load_tensors(path)
    head = head_from_state(state, path)
    if embed_dim is not None and head.input_dim != embed_dim:
        raise UserError(
            f"aesthetic head {Path(path).name} takes {head.input_dim}-d embeddings but the CLIP model gives "
            f"{embed_dim}-d ones (the LAION heads need CLIP ViT-L/14: --clip-model openai/clip-vit-large-patch14)")
    return head


def tiny_head(embed_dim: int, seed: int = 0) -> AestheticHead:
    """A random MLP head in the V2 layout, for tests and smoke runs."""
    sizes = [embed_dim, 32, 16, 8, 4, 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linears = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    return AestheticHead(linears, name=f"aesthetic-tiny(seed={seed})")
