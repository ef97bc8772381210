"""Attention Refocusing (MagiCapture Eq. 8) and the two figures that show information spill.

    L_attn = E_{k, v in {s, r}} [ || (S(A_k) - M_v) * not(M_v) ||_2^2 ]

``A_k``: cross-attention map of special token k; ``S``: min-max scaling to [0, 1] with the min and max
treated as constants (no gradient through them); ``M_v``: the token's binary target mask. Only pixels where
the mask is 0 are penalised (their target is 0); values inside the mask are free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def minmax_scale(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each map (last two dims) to [0, 1]; min and max are detached constants (the paper's S)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True).detach()
    hi = maps.amax(dim=(-2, -1), keepdim=True).detach()
    return (maps - lo) / (hi - lo + eps)


def _resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    if mask.shape[-1] == size:
        return mask
    return F.interpolate(mask.float(), size=(size, size), mode="nearest")


def attention_refocusing_loss(maps: torch.Tensor, mask: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8 for one token.

    ``maps``: (L, B, heads, S, S) attention probabilities of the token, one per captured layer and head,
    already at the mask resolution S (the authors upsample to 64x64 at 512 px, i.e. the latent size).
    ``mask``: (B, 1, S, S) binary target mask M_v. Each (layer, head) map is scaled with S(.), the scaled
    maps are averaged, and the squared error to the mask is taken outside the mask only.
    ``present``: (B,) bool, samples whose prompt contains the token (others contribute nothing).
    """
    scaled = minmax_scale(maps).mean(dim=(0, 2))  # (B, S, S)
    m = _resize_mask(mask, scaled.shape[-1])[:, 0].to(scaled.dtype)
    per_pixel = ((scaled - m) * (1 - m)).pow(2)
    per_sample = per_pixel.mean(dim=(-2, -1))
    if present is None:
        return per_sample.mean()
    w = present.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=1)


@torch.no_grad()
def attention_outside(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the [0,1]-scaled map outside the mask (what Eq. 8 pushes to 0), per sample: (B,)."""
    scaled = minmax_scale(maps).mean(dim=(0, 2))
    outside = 1 - _resize_mask(mask, scaled.shape[-1])[:, 0].to(scaled.dtype)
    return (scaled * outside).sum(dim=(-2, -1)) / outside.sum(dim=(-2, -1)).clamp(min=1)


@torch.no_grad()
def attention_spill(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the token's raw attention mass that falls outside its mask, per sample: (B,).

    ``maps`` may be at any resolution; the mask is area-downsampled to it (fractional at edges).
    """
    raw = maps.mean(dim=(0, 2))  # (B, S, S)
    size = raw.shape[-1]
    m = mask.float()
    if m.shape[-1] != size:
        m = F.adaptive_avg_pool2d(m, size) if m.shape[-1] > size else F.interpolate(m, size=(size, size), mode="nearest")
    outside = 1 - m[:, 0]
    total = raw.sum(dim=(-2, -1)).clamp(min=1e-12)
    return (raw * outside).sum(dim=(-2, -1)) / total
