"""The identity objective of composed prompt learning (MagiCapture Eq. 7) and Tweedie's estimate of x0.

    L_id = E [ 1 - cos( R(B(x0_hat)), R(B(I_s)) ) ],   x0_hat = D(z0_hat)

with z0_hat from the noisy latent z_t by Tweedie's formula:
    z0_hat = (z_t - sqrt(1 - a_t) * eps_hat) / sqrt(a_t)            (epsilon prediction)
    z0_hat = sqrt(a_t) * z_t - sqrt(1 - a_t) * v_hat                 (v prediction, SD 2.x 768-v)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tweedie_x0(z_t: torch.Tensor, model_out: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """Estimate the clean latent from ``z_t`` and the model output at timesteps ``t`` (B,)."""
    a = alphas_cumprod.to(device=z_t.device, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    z = z_t.float()
    out = model_out.float()
    if prediction_type == "epsilon":
        return (z - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def identity_loss(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``1 - cos(R(B(x0_hat)), R(B(I_s)))`` averaged over the batch.

    ``generated``: (B, D) embeddings of the aligned generated faces (with gradient); ``reference``: (D,) or
    (B, D) source identity embedding(s) (the mean over the source images, a constant).
    """
    ref = reference.detach().to(generated.dtype)
    if ref.dim() == 1:
        ref = ref.expand_as(generated)
    return (1 - F.cosine_similarity(generated, ref, dim=-1)).mean()
