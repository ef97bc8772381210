"""Attention-based semantic segmentation of the generated image (MagicFace, arXiv:2408.07433, used by RBA).

RBA needs to know, at every step, which target pixels show which concept. MagicFace reads it off the UNet's own
attention of the conditional target, as the authors' code does:

1. per layer with at most ``(latent / 2)^2`` queries, head-averaged self-attention ``SA`` (N, N) and the
   cross-attention ``CA`` (N, 77) of the same transformer block;
2. cross-attention propagated by self-attention, ``((SA + 3 SA^2) / 4) @ CA`` (each pixel borrows the token
   affinities of the pixels it attends to: regions become coherent);
3. each token map upsampled (bilinear) to the segmentation size, blurred (3x3 Gaussian, sigma 0.5, reflect
   padding) and divided by its spatial mean;
4. averaged over layers; tokens that are no concept word multiplied by ``other_scale`` (0.9);
5. argmax over tokens per pixel: a pixel belongs to concept ``i`` when its best token is one of concept ``i``'s.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .capture import AttentionStore

#: colours of concepts 0, 1, 2, ... in mask pictures; unassigned pixels are dark grey
PALETTE = ((230, 60, 60), (60, 170, 230), (250, 200, 40), (120, 200, 90), (190, 90, 220), (250, 140, 40))
UNASSIGNED = (40, 40, 40)


def propagate(sa: torch.Tensor, ca: torch.Tensor) -> torch.Tensor:
    """``((SA + 3 SA^2) / 4) @ CA``: (N, N) self-attention, (N, T) cross-attention -> (N, T)."""
    sa = sa.float()
    return ((sa + 3 * (sa @ sa)) / 4) @ ca.float()


def gaussian_blur(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Blur each (h, w) map of ``maps`` (C, h, w) with a normalised ``size`` x ``size`` Gaussian, reflect padding."""
    r = size // 2
    x = torch.arange(size, dtype=torch.float32) - r
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(g, g) / g.sum() ** 2
    padded = F.pad(maps[:, None].float(), (r, r, r, r), mode="reflect" if min(maps.shape[-2:]) > r else "replicate")
    return F.conv2d(padded, kernel[None, None].to(maps.device))[:, 0]


def token_maps(pairs: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> torch.Tensor:
    """Per-token relevance maps (T, size, size) from (self-attention, cross-attention) pairs of several layers."""
    total = None
    for sa, ca in pairs:
        side = math.isqrt(sa.shape[0])
        m = propagate(sa, ca).T.reshape(ca.shape[-1], side, side)
        if side != size:
            m = F.interpolate(m[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        m = gaussian_blur(m)
        m = m / (m.mean(dim=(1, 2), keepdim=True) + 1e-8)
        total = m if total is None else total + m
    if total is None:
        raise RuntimeError("no self/cross-attention pairs were captured for the segmentation")
    return total / len(pairs)


def assign_pixels(maps: torch.Tensor, concept_tokens: list[list[int]], other_scale: float = 0.9) -> torch.Tensor:
    """Concept index per pixel (-1: none) from token maps (T, h, w); ``concept_tokens[i]``: prompt positions of
    concept ``i``'s word (all sub-tokens, all occurrences)."""
    weight = torch.full((maps.shape[0],), float(other_scale))
    owner = torch.full((maps.shape[0],), -1, dtype=torch.long)
    for i, positions in enumerate(concept_tokens):
        weight[positions] = 1.0
        owner[positions] = i
    best = torch.argmax(maps * weight[:, None, None].to(maps.device), dim=0)
    return owner.to(best.device)[best]


def layer_pairs(store: AttentionStore) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (SA, CA) maps of the target recorded in ``store.full``, paired by transformer block (``attn1``/``attn2``)."""
    pairs = []
    for name, sa in store.full.items():
        if name.endswith("attn1") and name[:-1] + "2" in store.full:
            pairs.append((sa[0], store.full[name[:-1] + "2"][0]))
    return pairs


def segment(store: AttentionStore, concept_tokens: list[list[int]], size: int, other_scale: float = 0.9) -> torch.Tensor:
    """The (size, size) concept assignment of the conditional target from the maps of one UNet pass."""
    return assign_pixels(token_maps(layer_pairs(store), size), concept_tokens, other_scale)


def render(assignment: torch.Tensor, size: int | None = None) -> Image.Image:
    """A picture of a segmentation: concept ``i`` in ``PALETTE[i]``, unassigned pixels dark grey."""
    colours = np.array([UNASSIGNED, *PALETTE], dtype=np.uint8)
    a = assignment.cpu().numpy()
    img = Image.fromarray(colours[np.where(a >= 0, a % len(PALETTE) + 1, 0)])
    return img.resize((size, size), Image.Resampling.NEAREST) if size else img
