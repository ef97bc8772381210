"""Losses: one function per paper equation; each docstring cites its equation."""

from .attention import attention_outside, attention_refocusing_loss, attention_spill, minmax_scale
from .identity import identity_loss, tweedie_x0
from .reconstruction import denoising_loss, masked_denoising_loss
from .tailor import (cross_attention_loss, degradation_weight, masked_degradation, minmax_select, per_concept_mean,
                     preservation_loss, token_attention_map)
from .structure import key_self_similarity, patch_contrastive_loss, self_similarity_loss, style_cls_loss

__all__ = [
    "attention_outside",
    "attention_refocusing_loss",
    "attention_spill",
    "minmax_scale",
    "identity_loss",
    "tweedie_x0",
    "denoising_loss",
    "masked_denoising_loss",
    "key_self_similarity",
    "patch_contrastive_loss",
    "self_similarity_loss",
    "style_cls_loss",
    "cross_attention_loss",
    "degradation_weight",
    "masked_degradation",
    "minmax_select",
    "per_concept_mean",
    "preservation_loss",
    "token_attention_map",
]
