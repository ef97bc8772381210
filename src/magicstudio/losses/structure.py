"""Structure and style losses of MagiCapture's general-object mode (supplement, Eq. 11).

``L = l_ssim * L_ssim + l_contra * L_contra + l_style * L_style`` on the Tweedie estimate x0_hat of the composed
task, with DINO ViT features (``magicstudio.models.dino``): keys of the last self-attention layer for structure
(compared with a source image), the ``[CLS]`` token for style (compared with the reference image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity matrix of the patch keys, ``[B, N, D] -> [B, N, N]`` (Splice, Tumanyan et al. 2022)."""
    k = F.normalize(keys.float(), dim=-1)
    return k @ k.transpose(1, 2)


def self_similarity_loss(keys_gen: torch.Tensor, keys_src: torch.Tensor) -> torch.Tensor:
    """L_ssim of Eq. 11 with the authors' scaling (their ``loss_vit.py``; ../shared/METHODS.md): the mean squared
    error between the keys' cosine self-similarity matrices ``S(x0_hat)`` and ``S(I_s)``, over every entry of every
    sample (the paper writes a Frobenius norm; on a 784-patch map that is ~5e4 times the MSE and swamps every other
    term at the paper's weights). Zero when the structures match; invariant to anything that scales the keys. The
    source side is a target (no gradient)."""
    return F.mse_loss(key_self_similarity(keys_gen), key_self_similarity(keys_src.detach()))


def patch_contrastive_loss(keys_gen: torch.Tensor, keys_src: torch.Tensor, tau: float = 0.07,
                           num_patches: int | None = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """L_contra of Eq. 11: PatchNCE (Park et al. 2020) on DINO keys. Each generated patch's key is the query; the
    source key at the same position is the positive, the source keys at the other (sampled) positions are the
    negatives: ``mean_i -log softmax_j(cos(q_i, k_j) / tau)[i]``. ``num_patches``: positions sampled per image
    (None: all)."""
    b, n, _ = keys_gen.shape
    if num_patches is not None and num_patches < n:
        idx = torch.randperm(n, generator=generator)[:num_patches].to(keys_gen.device)
        keys_gen, keys_src = keys_gen[:, idx], keys_src[:, idx]
    q = F.normalize(keys_gen.float(), dim=-1)
    k = F.normalize(keys_src.detach().float(), dim=-1)
    logits = q @ k.transpose(1, 2) / tau  # [B, n, n]; row i: query i against every source position
    target = torch.arange(logits.shape[1], device=logits.device).expand(b, -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def style_cls_loss(cls_gen: torch.Tensor, cls_ref: torch.Tensor) -> torch.Tensor:
    """L_style of Eq. 11 with the authors' scaling (their ``loss_vit.py``; ../shared/METHODS.md): the mean squared
    error between the DINO ``[CLS]`` tokens of x0_hat and of the reference (Splice's appearance loss), over every
    feature of every sample (not the L2 norm the paper writes). The reference side is a target (no gradient)."""
    return F.mse_loss(cls_gen.float(), cls_ref.detach().float())
