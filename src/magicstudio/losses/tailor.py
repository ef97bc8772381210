"""MagicTailor (arXiv 2410.13370): the equations of DM-Deg and DS-Bal, and its cross-attention loss.

DM-Deg (Sec. 3.2, "Dynamic Masked Degradation"), in pixel space after normalisation, outside the mask only:
    x' = clamp(x + w(step) * eps * (1 - M), -1, 1),  eps ~ N(0, I),
    w(step) = alpha * (1 - ((step + 1) / T) ** gamma)          (alpha 0.5, gamma 32, T all training steps)
Masked diffusion loss (Sec. 3.2, as Break-A-Scene): || (eps - eps_theta) * M ||^2 (``masked_denoising_loss``).
Cross-attention loss (Sec. 3.2): || A_k / max(A_k) - M_k ||^2, with A_k token k's cross-attention map averaged over
the heads and the 16x16 layers of the down and up blocks, and M_k its mask resized to 16x16.
DS-Bal (Sec. 3.3, "Dual-Stream Balancing"): sample-wise min-max: of the per-concept losses L_i (each the mean over
that concept's images) the online U-Net optimises the largest, argmax_i L_i; selective preservation: on the other
concepts, lambda_pres * || eps_online - eps_momentum ||^2 with the momentum (EMA) U-Net's output as a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def degradation_weight(step: int, total: int, alpha: float = 0.5, gamma: float = 32.0, dynamic: bool = True) -> float:
    """DM-Deg intensity ``w = alpha * (1 - ((step + 1) / T) ** gamma)`` at 0-based optimizer step ``step`` of
    ``T = total`` (w(0) ~ alpha, w(T - 1) = 0); ``dynamic=False``: the constant ``alpha`` (the paper's
    "fixed intensity" ablation)."""
    if not dynamic:
        return float(alpha)
    return float(alpha * (1.0 - ((step + 1) / total) ** gamma))


def masked_degradation(images: torch.Tensor, mask: torch.Tensor, weight: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """DM-Deg: ``clamp(x + w * N(0, 1) * (1 - M), -1, 1)``; pixels with M = 1 are returned bit-identical.

    ``images``: (B, 3, H, W) in [-1, 1]; ``mask``: (B, 1, H, W) in [0, 1] at the image size. The noise is drawn
    (on the CPU, from ``generator``) even when ``weight`` is 0, so a run's random stream does not depend on it.
    """
    if mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape[-2:])} must be at the image size {tuple(images.shape[-2:])}")
    noise = torch.randn(images.shape, generator=generator).to(images)
    m = mask.to(images.dtype)
    degraded = (images + weight * noise * (1 - m)).clamp(-1, 1)
    return torch.where(m >= 1, images, degraded)


def token_attention_map(maps: torch.Tensor) -> torch.Tensor:
    """``maps`` (L, B, heads, S, S): one token's cross-attention probabilities on L layers -> (B, S, S), the mean
    over layers and heads."""
    return maps.float().mean(dim=(0, 2))


def cross_attention_loss(maps: torch.Tensor, mask: torch.Tensor, per_sample: bool = False,
                         eps: float = 1e-8) -> torch.Tensor:
    """MagicTailor's (and Break-A-Scene's) cross-attention loss for one token per sample:
    ``MSE(A / max(A), M)`` with ``A`` the layer/head mean of ``maps`` ((L, B, heads, S, S)) and ``M`` the binary
    ``mask`` ((B, 1, h, w)) resized to S x S (nearest, as ``F.interpolate`` does by default in the authors' code).
    The max is part of the graph (the authors divide by it as it is). ``per_sample``: shape (B,)."""
    a = token_attention_map(maps)
    a = a / (a.amax(dim=(-2, -1), keepdim=True) + eps)
    m = mask.float()
    if m.shape[-1] != a.shape[-1]:
        m = F.interpolate(m, size=a.shape[-2:], mode="nearest")
    per = (a - m[:, 0]).pow(2).mean(dim=(-2, -1))
    return per if per_sample else per.mean()


def per_concept_mean(per_sample: torch.Tensor, concept_of: list[int] | torch.Tensor, n_concepts: int) -> torch.Tensor:
    """The mean of ``per_sample`` (B,) over each concept's samples: (n_concepts,). Concepts may have different
    numbers of samples (the authors' reshape needs equal ones); a concept without samples gets -inf (never chosen)."""
    idx = torch.as_tensor(concept_of, dtype=torch.long, device=per_sample.device)
    sums = torch.zeros(n_concepts, dtype=per_sample.dtype, device=per_sample.device).index_add(0, idx, per_sample)
    counts = torch.zeros(n_concepts, dtype=per_sample.dtype, device=per_sample.device).index_add(
        0, idx, torch.ones_like(per_sample))
    means = sums / counts.clamp(min=1)
    return torch.where(counts > 0, means, torch.full_like(means, float("-inf")))


def minmax_select(per_sample: torch.Tensor, concept_of: list[int] | torch.Tensor, n_concepts: int
                  ) -> tuple[int, torch.Tensor]:
    """DS-Bal's sample-wise min-max: ``(argmax_i L_i, L)`` with ``L_i`` concept i's mean loss over its images
    (``per_concept_mean``); the caller optimises ``L[argmax]`` (the max of the per-concept losses)."""
    means = per_concept_mean(per_sample, concept_of, n_concepts)
    chosen = int(torch.argmax(means.detach()))
    return chosen, means


def preservation_loss(online: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """DS-Bal's selective preservation regularisation (without its weight lambda_pres = 0.2):
    ``MSE(eps_online, eps_momentum)``, the momentum branch a constant (no gradient reaches it)."""
    return F.mse_loss(online.float(), momentum.detach().float())
