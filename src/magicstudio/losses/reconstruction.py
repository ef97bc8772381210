"""Reconstruction objectives on the predicted noise.

MagiCapture (arXiv 2309.06895) Eq. 1 (plain LDM loss) and Eqs. 4, 5, 6 (masked reconstruction):
    L_mask = E || eps * M - eps_theta(z_t, t, c) * M ||_2^2
with M the face mask (source task, Eq. 4) or the non-face mask (reference task, Eq. 5; composed task with the
reference image as pseudo-label, Eq. 6), downsampled to the latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_MODES = ("paper", "official")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Eq. 1: mean squared error between the model output and its target (noise, or v).

    ``per_sample``: one value per batch element (the mean over its other dimensions), shape (B,), for callers
    that weigh parts of a batch differently (DreamBooth's instance and prior terms)."""
    if per_sample:
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return F.mse_loss(pred.float(), target.float())


def masked_denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mode: str = "paper",
                          per_sample: bool = False) -> torch.Tensor:
    """Eqs. 4-6: ``|| target * M - pred * M ||^2``, averaged over elements.

    ``mask``: (B, 1, h, w) in [0, 1] at the latent size (broadcast over channels).
    ``mode="paper"``: exactly the equation, mean over all elements (``per_sample``: over each sample's, shape (B,);
    MagicTailor's masked diffusion loss, whose DS-Bal needs each image's value).
    ``mode="official"``: the authors' code: the mask is softened to ``(M + 0.01) / max`` so no region has zero
    weight, and the mean is rescaled by (all area / mask area) so small masks are not down-weighted.
    """
    if mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape[-2:])} must be at the latent size {tuple(pred.shape[-2:])}")
    mask = mask.to(pred.dtype)
    if mode == "paper":
        if per_sample:
            sq = (pred.float() * mask - target.float() * mask).pow(2)
            return sq.mean(dim=tuple(range(1, pred.dim())))
        return F.mse_loss(pred.float() * mask, target.float() * mask)
    if per_sample:
        raise ValueError("per_sample is only defined for mode='paper'")
    if mode == "official":
        soft = mask + 0.01
        soft = soft / soft.amax(dim=(-2, -1), keepdim=True)
        area = mask.sum(dim=(-2, -1)).clamp(min=1.0)  # (B, 1)
        scale = (mask.shape[-1] * mask.shape[-2]) / area
        per = ((pred.float() - target.float()) * soft).pow(2).mean(dim=(1, 2, 3))
        return (per * scale.view(-1)).mean()
    raise ValueError(f"unknown mask mode {mode!r}; use one of {MASK_MODES}")
