"""The two halves of diffusers' ``AttnProcessor2_0``, shared by every processor of this project.

``project`` does what the default processor does before attention (spatial/group norm, Q/K/V projections with
any LoRA, heads split, q/k norms) and ``finish`` what it does after (heads merged, output projection, residual,
rescale). A processor calls ``project``, computes its own attention over ``(B, heads, N, head_dim)`` tensors,
and ``finish``: the capture processor with explicit probabilities (``capture.py``), MagicFace's RSA/RBA
(``magicface.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Projected:
    """Q/K/V of one attention call as ``(B, heads, N, head_dim)`` plus what is needed to finish the layer."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    residual: torch.Tensor
    shape4d: tuple[int, int, int, int] | None
    is_cross: bool


def project(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None) -> Projected:
    """The input half of diffusers' ``AttnProcessor2_0``, step for step (same ops, same order, LoRA included)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4d = None
    if hidden_states.ndim == 4:
        shape4d = tuple(hidden_states.shape)
        b, c, h, w = shape4d
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    is_cross = encoder_hidden_states is not None
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return Projected(query, key, value, attention_mask, residual, shape4d, is_cross)


def finish(attn, out: torch.Tensor, p: Projected) -> torch.Tensor:
    """The output half of ``AttnProcessor2_0``: merge heads, output projection, residual, rescale."""
    batch, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(p.query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if p.shape4d is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*p.shape4d)
    if attn.residual_connection:
        hidden_states = hidden_states + p.residual
    return hidden_states / attn.rescale_output_factor
