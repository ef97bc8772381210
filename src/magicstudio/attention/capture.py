"""Capturing attention probabilities from chosen UNet layers, keeping SDPA everywhere else.

diffusers' default processor (``AttnProcessor2_0``) calls ``scaled_dot_product_attention`` and never
materialises the probabilities. On the few layers a loss or a visualisation needs, ``CaptureProcessor``
computes ``softmax(QK^T / sqrt(d))`` explicitly (paper Eq. 2, differentiable), hands it to an
``AttentionStore`` and multiplies by V itself. Processors are keyed by module name, as diffusers does, so
other methods can stack their own processors on other layers.

What the store keeps is chosen by the caller:
- ``token_index``: a (B, K) long tensor of prompt positions (-1 = absent). Cross-attention layers then record
  ``maps[name]`` of shape (B, heads, H, W, K): the probability columns of those tokens only (cheap).
- ``keep_full=True``: record head-averaged full maps (B, HW, S) without grad (MagicFace segmentation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .projection import finish, project

try:  # the Attention class moved in recent diffusers; processors only need its public attributes
    from diffusers.models.attention_processor import AttnProcessor2_0
except ImportError:  # pragma: no cover
    AttnProcessor2_0 = None


@dataclass
class AttentionStore:
    """Collects attention maps during one UNet forward pass (``reset()`` before each)."""

    token_index: torch.Tensor | None = None
    keep_full: bool = False
    keep_self: bool = False
    full_max_tokens: int = 1024
    active: bool = True
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        self.maps = {}
        self.full = {}

    def record(self, name: str, probs: torch.Tensor, batch: int, is_cross: bool) -> None:
        """``probs``: (B*heads, Nq, Nk) probabilities of layer ``name``."""
        if not self.active:
            return
        heads = probs.shape[0] // batch
        nq = probs.shape[1]
        side = int(math.isqrt(nq))
        if is_cross and self.token_index is not None:
            p = probs.view(batch, heads, nq, probs.shape[-1])
            idx = self.token_index.to(p.device)
            safe = idx.clamp(min=0)
            cols = torch.gather(p, 3, safe[:, None, None, :].expand(batch, heads, nq, safe.shape[1]))
            cols = cols * (idx >= 0)[:, None, None, :].to(cols.dtype)
            if side * side == nq:
                self.maps[name] = cols.view(batch, heads, side, side, -1)
            else:  # non-square latents: keep the flat map; callers reshape with the known aspect
                self.maps[name] = cols
        if self.keep_full and nq <= self.full_max_tokens and (is_cross or self.keep_self):
            with torch.no_grad():
                self.full[name] = probs.view(batch, heads, nq, -1).mean(1).detach()


class CaptureProcessor:
    """Attention with explicit probabilities, reporting them to ``store`` under ``name``.

    Numerically the same as diffusers' processors (same Q/K/V projections, LoRA included, same scale), but
    the probabilities exist as a tensor with a gradient.
    """

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        p = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, heads, nq, head_dim = p.query.shape
        flat = lambda x: x.reshape(batch * heads, -1, head_dim)  # noqa: E731  (diffusers' head_to_batch_dim layout)
        mask = None if p.mask is None else p.mask.reshape(batch * heads, -1, p.mask.shape[-1])
        probs = attn.get_attention_scores(flat(p.query), flat(p.key), mask)  # softmax(QK^T/sqrt(d)), Eq. 2
        self.store.record(self.name, probs, batch, p.is_cross)
        out = torch.bmm(probs, flat(p.value)).view(batch, heads, nq, head_dim)
        return finish(attn, out, p)


def _down_factor(name: str, n_down: int) -> int | None:
    """UNet downsampling factor of the block holding ``name`` (1 = full latent resolution)."""
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
    if m:
        i = int(m.group(2))
        return 2**i if m.group(1) == "down_blocks" else 2 ** (n_down - 1 - i)
    if name.startswith("mid_block"):
        return 2 ** (n_down - 1)
    return None


def select_layers(unet, which: str | list[str] = "paper", kind: str = "attn2") -> list[str]:
    """Names (``...attn2``) of the attention layers to capture.

    ``"paper"``: cross-attention of the down and up blocks at 1/4 of the latent resolution (16x16 at 512 px:
    down_blocks.2 and up_blocks.1 of SD 1.x/2.x, 5 layers), as in the authors' code. ``"all"``: every layer of
    ``kind``. ``"down:<f>,up:<f>"`` style is not needed; a list of names or regexes selects explicitly.
    ``"res:<f>"`` picks down and up blocks whose downsampling factor is ``f`` (``"res:4"`` == ``"paper"``).
    """
    from ..errors import UserError

    names = [n for n, m in unet.named_modules() if n.endswith("." + kind)]
    n_down = len(unet.config.block_out_channels)
    if isinstance(which, str):
        if which == "all":
            return names
        if which == "paper":
            which = "res:4"
        if which.startswith("res:"):
            parts = which[4:].split("+")
            if not all(p.strip().isdigit() for p in parts):
                raise UserError(f"bad layer spec {which!r}: expected res:<factors>, e.g. res:4 or res:1+2")
            factors = {int(x) for x in parts}
            picked = [n for n in names if not n.startswith("mid_block") and _down_factor(n, n_down) in factors]
            if not picked:
                valid = sorted({f for n in names if not n.startswith("mid_block")
                                for f in [_down_factor(n, n_down)] if f is not None})
                raise UserError(f"layer spec {which!r} selects no attention layer ({kind}); this model's factors "
                                f"are {'+'.join(map(str, valid))}")
            return picked
        which = [which]
    for w in which:
        try:
            re.compile(w)
        except (re.error, TypeError) as exc:
            raise UserError(f"bad layer spec {w!r}: not a layer name or regular expression ({exc})") from None
    picked = [n for n in names if any(n == w or re.fullmatch(w, n) for w in which)]
    if not picked:
        raise UserError(f"layer spec {which} selects no attention layer ({kind})")
    return picked


def install_capture(unet, store: AttentionStore, layers: list[str]) -> dict:
    """Put ``CaptureProcessor`` on ``layers`` (module names), SDPA on the rest; returns the previous processors."""
    previous = dict(unet.attn_processors)
    wanted = set(layers)
    procs = {}
    for key, proc in previous.items():
        module = key[: -len(".processor")]
        procs[key] = CaptureProcessor(store, module) if module in wanted else proc
    unet.set_attn_processor(procs)
    return previous


def restore_processors(unet, previous: dict) -> None:
    unet.set_attn_processor(previous)


def resize_token_maps(m: torch.Tensor, size: int) -> torch.Tensor:
    """Token maps (B, heads, S, S, K) resized to (B, heads, size, size, K), bilinear (the one place maps are resized)."""
    if m.shape[2] == size:
        return m
    b, h, s, _, k = m.shape
    x = m.permute(0, 1, 4, 2, 3).reshape(b * h * k, 1, s, s)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.view(b, h, k, size, size).permute(0, 1, 3, 4, 2)


def stack_token_maps(store: AttentionStore, size: int | None = None) -> torch.Tensor:
    """All captured token maps as (L, B, heads, S, S, K), resized to ``size`` (bilinear) when given."""
    out = []
    for m in store.maps.values():
        out.append(m if size is None else resize_token_maps(m, size))
    if not out:
        raise RuntimeError("no attention maps were captured (are the capture processors installed?)")
    return torch.stack(out)
