"""Face restoration for the post-processing step: CodeFormer (the authors' choice, fidelity w = 0.5) or GFPGAN v1.3/1.4.

Pipeline (as in CodeFormer's and GFPGAN's inference scripts): find the faces, warp each onto the FFHQ 5-point template
of a 512 x 512 crop, restore the crop, warp it back with the inverse similarity and blend it in with a feathered
mask. Landmarks come from :class:`magicstudio.data.faces.MediapipeFaceAnalyzer` (or any ``FaceAnalyzer``); the
warps are :func:`magicstudio.models.face_align.warp_affine` (bilinear, OpenCV conventions).

Both networks are written here from their papers' descriptions with the module layout of the published checkpoints,
so ``codeformer.pth`` and ``GFPGANv1.3.pth`` / ``GFPGANv1.4.pth`` (state dicts under ``params_ema``) load with
``strict=True``. No weights ship with magicstudio and none are downloaded: the user passes the file. Pickles are read
with ``torch.load(weights_only=True)`` only, so a checkpoint can never run code. Any other restorer plugs in through
the :class:`FaceRestorer` protocol (a callable on ``[B, 3, 512, 512]`` tensors in ``[-1, 1]``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import UserError

RestoreBackend = Literal["auto", "codeformer", "gfpgan"]
RESTORE_BACKENDS: tuple[str, ...] = ("auto", "codeformer", "gfpgan")

#: facexlib's FFHQ template: the five landmarks (ArcFace order) in a 512 x 512 aligned face, OpenCV pixel centres
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.19360),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
#: fill colour outside the image when a face crop reaches past the border (facexlib's borderValue, as RGB)
CROP_FILL_RGB = (132, 133, 135)
FACE_SIZE = 512


# ----------------------------------------------------------------------------------------------------------------
# CodeFormer (Zhou et al., NeurIPS 2022): VQGAN encoder -> transformer predicting codebook indices -> VQGAN decoder,
# with controllable feature transformation (CFT) from encoder to decoder features, weighted by the fidelity w.
# ----------------------------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class VQResBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, plus a (1x1-projected when the width changes) skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        if in_ch != out_ch:
            self.conv_out = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_out(x) if self.in_ch != self.out_ch else x)


class VQAttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj convolutions and a residual."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class VQDownsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VQUpsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQEncoder(nn.Module):
    """Flat ``blocks`` list: conv, (res x n [+attn at attention resolutions], downsample) per level, then res, attn,
    res, GroupNorm, conv to the latent width. ``taps[size]``: index of the block whose output is the last residual
    feature at spatial size ``size`` (what CFT reads)."""

    def __init__(self, nf: int, emb_dim: int, ch_mult: tuple[int, ...], res_blocks: int, img_size: int,
                 attn_sizes: tuple[int, ...]) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1)]
        self.taps: dict[int, int] = {}
        size, ch = img_size, nf
        for level, mult in enumerate(ch_mult):
            for _ in range(res_blocks):
                blocks.append(VQResBlock(ch, nf * mult))
                ch = nf * mult
                self.taps[size] = len(blocks) - 1
                if size in attn_sizes:
                    blocks.append(VQAttnBlock(ch))
            if level != len(ch_mult) - 1:
                blocks.append(VQDownsample(ch))
                size //= 2
        blocks += [VQResBlock(ch, ch), VQAttnBlock(ch), VQResBlock(ch, ch), _group_norm(ch), nn.Conv2d(ch, emb_dim, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)
        self.tap_channels = {s: blocks[i].out_ch for s, i in self.taps.items()}


class VQGenerator(nn.Module):
    """Mirror of :class:`VQEncoder`: conv, res, attn, res, then per level (coarse to fine) res x n [+attn],
    upsample, and GroupNorm + conv to RGB. ``taps[size]``: index of the first residual block at ``size`` (after
    which CFT fuses the encoder feature)."""

    def __init__(self, nf: int, emb_dim: int, ch_mult: tuple[int, ...], res_blocks: int, img_size: int,
                 attn_sizes: tuple[int, ...]) -> None:
        super().__init__()
        ch = nf * ch_mult[-1]
        size = img_size // 2 ** (len(ch_mult) - 1)
        blocks: list[nn.Module] = [nn.Conv2d(emb_dim, ch, 3, 1, 1), VQResBlock(ch, ch), VQAttnBlock(ch), VQResBlock(ch, ch)]
        self.taps: dict[int, int] = {}
        for level in reversed(range(len(ch_mult))):
            for r in range(res_blocks):
                blocks.append(VQResBlock(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if r == 0:
                    self.taps[size] = len(blocks) - 1
                if size in attn_sizes:
                    blocks.append(VQAttnBlock(ch))
            if level != 0:
                blocks.append(VQUpsample(ch))
                size *= 2
        blocks += [_group_norm(ch), nn.Conv2d(ch, 3, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)


class VectorQuantizer(nn.Module):
    """The VQGAN codebook (only looked up at inference)."""

    def __init__(self, codebook_size: int, emb_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)


class CodeTransformerLayer(nn.Module):
    """Pre-norm transformer layer: self-attention with the position embedding added to queries and keys, GELU MLP."""

    def __init__(self, dim: int, heads: int, dim_mlp: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = h + pos
        x = x + self.self_attn(qk, qk, h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFTBlock(nn.Module):
    """Controllable feature transformation: ``dec + w * (dec * scale + shift)`` with scale and shift predicted from
    the concatenated encoder and decoder features."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.encode_enc = VQResBlock(2 * ch, ch)
        self.scale = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(ch, ch, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(ch, ch, 3, 1, 1))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        feat = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(feat) + self.shift(feat))


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give ``content`` the per-channel mean and (unbiased) std of ``style``."""

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    """CodeFormer. The defaults are the published model (512 px faces, 1024-entry codebook of 256-d codes, 9-layer
    512-d transformer, CFT at 32-256 px): its ``codeformer.pth`` ``params_ema`` loads with ``strict=True``.

    ``forward(x, w)``: ``x`` is ``[B, 3, S, S]`` RGB in ``[-1, 1]``; ``w`` in ``[0, 1]`` trades quality (0: the
    codebook's face) for fidelity to the input (1). ``adain=True`` (the inference script's setting) matches the
    codebook feature's statistics to the encoder's before decoding.
    """

    def __init__(self, dim_embd: int = 512, n_head: int = 8, n_layers: int = 9, codebook_size: int = 1024,
                 connect_list: tuple[int, ...] = (32, 64, 128, 256), *, img_size: int = 512, nf: int = 64,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 8), res_blocks: int = 2, emb_dim: int = 256,
                 attn_sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.img_size = img_size
        self.latent = img_size // 2 ** (len(ch_mult) - 1)
        attn_sizes = (self.latent,) if attn_sizes is None else attn_sizes
        self.encoder = VQEncoder(nf, emb_dim, ch_mult, res_blocks, img_size, attn_sizes)
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        self.generator = VQGenerator(nf, emb_dim, ch_mult, res_blocks, img_size, attn_sizes)
        self.connect_list = tuple(int(s) for s in connect_list)
        self.position_emb = nn.Parameter(torch.zeros(self.latent**2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*[CodeTransformerLayer(dim_embd, n_head, 2 * dim_embd) for _ in range(n_layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))
        self.fuse_convs_dict = nn.ModuleDict(
            {str(s): FuseSFTBlock(self.encoder.tap_channels[s]) for s in self.connect_list})

    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True) -> torch.Tensor:
        enc_taps = {self.encoder.taps[s]: s for s in self.connect_list}
        enc_feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in enc_taps:
                enc_feats[enc_taps[i]] = x
        lq_feat = x  # [B, emb_dim, latent, latent]
        b, c, h, wd = lq_feat.shape
        tokens = self.feat_emb(lq_feat.flatten(2).transpose(1, 2))  # [B, HW, dim]
        pos = self.position_emb.unsqueeze(0)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        logits = self.idx_pred_layer(tokens)  # [B, HW, codebook]
        idx = logits.argmax(dim=2)  # top-1 of the softmax
        quant = self.quantize.embedding(idx).transpose(1, 2).reshape(b, c, h, wd)
        if adain:
            quant = _adain(quant, lq_feat)
        dec_taps = {self.generator.taps[s]: s for s in self.connect_list}
        x = quant
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in dec_taps and w > 0:
                size = dec_taps[i]
                x = self.fuse_convs_dict[str(size)](enc_feats[size], x, w)
        return x


# ----------------------------------------------------------------------------------------------------------------
# GFPGAN v1.3/v1.4 ("clean" architecture, Wang et al., CVPR 2021): a U-Net whose decoder features give spatial
# feature transforms (SFT) for a StyleGAN2 generator that is driven by per-layer latents from the U-Net bottleneck.
# ----------------------------------------------------------------------------------------------------------------


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (per-sample weights scaled by the style, optionally demodulated), no bias;
    ``upsample`` enlarges the input x2 bilinearly first."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False) -> None:
        super().__init__()
        self.out_ch, self.kernel, self.demodulate, self.upsample = out_ch, kernel, demodulate, upsample
        self.modulation = nn.Linear(style_dim, in_ch)
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel) / math.sqrt(in_ch * kernel**2))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4)) + 1e-8).view(b, self.out_ch, 1, 1, 1)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        h, w = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * self.out_ch, c, self.kernel, self.kernel),
                       padding=self.kernel // 2, groups=b)
        return out.view(b, self.out_ch, h, w)


class StyleConv(nn.Module):
    """Modulated 3x3 conv (x sqrt 2), scaled noise, bias, leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, True, upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * 2**0.5 + self.weight * noise
        return F.leaky_relu(out + self.bias, 0.2)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB plus bias, added to the (bilinearly enlarged) previous RGB."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class _ConstantInput(nn.Module):
    def __init__(self, ch: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, ch, size, size))


class _PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def _stylegan_channels(channel_multiplier: int, narrow: float) -> dict[int, int]:
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {k: int(v * narrow) for k, v in base.items()}


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 generator (bilinear resampling, no custom ops) whose features take SFT conditions on half their
    channels (``sft_half``, as in v1.3/1.4) or all of them. ``style_mlp`` is kept for checkpoint compatibility but
    GFPGAN feeds latents directly."""

    def __init__(self, out_size: int, style_dim: int = 512, num_mlp: int = 8, channel_multiplier: int = 2,
                 narrow: float = 1.0, sft_half: bool = True) -> None:
        super().__init__()
        self.sft_half = sft_half
        mlp: list[nn.Module] = [_PixelNorm()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2, True)]
        self.style_mlp = nn.Sequential(*mlp)
        ch = _stylegan_channels(channel_multiplier, narrow)
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2
        self.constant_input = _ConstantInput(ch[4], 4)
        self.style_conv1 = StyleConv(ch[4], ch[4], style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.style_convs.append(StyleConv(in_ch, out_ch, style_dim, upsample=True))
            self.style_convs.append(StyleConv(out_ch, out_ch, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor], noise: list[torch.Tensor]) -> torch.Tensor:
        """``latent``: ``[B, num_latent, style_dim]``; ``conditions``: scale, shift, scale, shift... per level;
        ``noise``: one map per StyleConv."""
        out = self.constant_input.weight.repeat(latent.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for level, to_rgb in enumerate(self.to_rgbs):
            conv1, conv2 = self.style_convs[2 * level], self.style_convs[2 * level + 1]
            out = conv1(out, latent[:, i], noise[i])
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if self.sft_half:
                    same, sft = torch.split(out, out.shape[1] // 2, dim=1)
                    out = torch.cat([same, sft * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = conv2(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class GFPResBlock(nn.Module):
    """conv, leaky ReLU, bilinear resize (x0.5 down / x2 up), conv, leaky ReLU, plus a resized 1x1-conv skip."""

    def __init__(self, in_ch: int, out_ch: int, mode: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), 0.2)
        out = F.interpolate(out, scale_factor=self.factor, mode="bilinear", align_corners=False)
        out = F.leaky_relu(self.conv2(out), 0.2)
        return out + self.skip(F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False))


class GFPGAN(nn.Module):
    """GFPGAN v1 "clean" with the v1.3/v1.4 settings (512 px, channel multiplier 2, a latent per StyleGAN layer,
    SFT on half the channels): ``GFPGANv1.3.pth`` / ``GFPGANv1.4.pth`` ``params_ema`` load with ``strict=True``.

    ``forward(x, noise_seed)``: ``x`` ``[B, 3, S, S]`` RGB in ``[-1, 1]``. StyleGAN's noise inputs are drawn
    from a generator seeded with ``noise_seed`` (the reference script draws them unseeded), or taken from the stored
    ``noises`` buffers when ``noise_seed`` is None.
    """

    def __init__(self, out_size: int = 512, style_dim: int = 512, channel_multiplier: int = 2, num_mlp: int = 8,
                 narrow: float = 1.0, sft_half: bool = True, different_w: bool = True) -> None:
        super().__init__()
        self.img_size = out_size
        self.style_dim, self.different_w = style_dim, different_w
        unet = _stylegan_channels(channel_multiplier, narrow * 0.5)
        self.log_size = int(math.log2(out_size))
        self.conv_body_first = nn.Conv2d(3, unet[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        in_ch = unet[out_size]
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(GFPResBlock(in_ch, unet[2 ** (i - 1)], "down"))
            in_ch = unet[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(in_ch, unet[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        self.toRGB = nn.ModuleList()  # intermediate RGB heads (training losses only)
        in_ch = unet[4]
        for i in range(3, self.log_size + 1):
            self.conv_body_up.append(GFPResBlock(in_ch, unet[2**i], "up"))
            in_ch = unet[2**i]
        for i in range(3, self.log_size + 1):
            self.toRGB.append(nn.Conv2d(unet[2**i], 3, 1))
        n_latent = (self.log_size * 2 - 2) if different_w else 1
        self.final_linear = nn.Linear(unet[4] * 16, n_latent * style_dim)
        self.stylegan_decoder = StyleGAN2DecoderSFT(out_size, style_dim, num_mlp, channel_multiplier, narrow, sft_half)
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for i in range(3, self.log_size + 1):
            ch = unet[2**i]
            sft_ch = ch if sft_half else 2 * ch
            for heads in (self.condition_scale, self.condition_shift):
                heads.append(nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2, True),
                                           nn.Conv2d(ch, sft_ch, 3, 1, 1)))

    def forward(self, x: torch.Tensor, noise_seed: int | None = 0) -> torch.Tensor:
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        style = self.final_linear(feat.flatten(1))
        dec = self.stylegan_decoder
        latent = style.view(style.shape[0], -1, self.style_dim)
        if not self.different_w:
            latent = latent.repeat(1, dec.num_latent, 1)
        conditions: list[torch.Tensor] = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[i])
            conditions += [self.condition_scale[i](feat), self.condition_shift[i](feat)]
        stored = [getattr(dec.noises, f"noise{i}") for i in range(dec.num_layers)]
        if noise_seed is None:
            noise = [n.to(x.dtype) for n in stored]
        else:
            gen = torch.Generator(device="cpu").manual_seed(int(noise_seed))
            noise = [torch.randn((x.shape[0], 1) + tuple(n.shape[2:]), generator=gen).to(x) for n in stored]
        return dec(latent, conditions, noise)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

_ARCH_NAMES = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a restoration checkpoint: ``.safetensors`` (via :func:`magicstudio.io.load_tensors`), or a pickle
    read with ``weights_only=True`` whose state dict is under ``params_ema`` (preferred, as the inference scripts do),
    ``params``, ``state_dict``, or at the top level. Anything else is a one-line UserError."""
    from ..io import PICKLE_SUFFIXES, load_tensors

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"face restoration weights not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    if path.suffix not in PICKLE_SUFFIXES:
        return load_tensors(path)  # safetensors, or its UserError for an unsupported suffix
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"refusing to load {path}: not a plain tensor checkpoint ({exc.__class__.__name__}); "
                        f"unpickling it could run code, or the file is damaged") from None
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors (looked under params_ema, params, state_dict)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def detect_backend(state: dict[str, torch.Tensor]) -> str | None:
    """``"codeformer"`` or ``"gfpgan"`` from a state dict's key names, None when neither."""
    if any(k.startswith("ft_layers.") for k in state) and "quantize.embedding.weight" in state:
        return "codeformer"
    if any(k.startswith("stylegan_decoder.") for k in state) and "final_linear.weight" in state:
        return "gfpgan"
    return None


def build_network(backend: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture for ``backend`` with ``state`` loaded strictly (a mismatch is a one-line UserError)."""
    found = detect_backend(state)
    if backend == "auto":
        if found is None:
            raise UserError("the weights are neither CodeFormer nor GFPGAN (unrecognised key names)")
        backend = found
    if backend not in _ARCH_NAMES:
        raise UserError(f"unknown face restoration backend {backend!r}: use {', '.join(RESTORE_BACKENDS)}")
    if found is not None and found != backend:
        raise UserError(f"these weights are {_ARCH_NAMES[found]}, not {_ARCH_NAMES[backend]}: use --restore-backend {found}")
    with torch.device("meta"):
        net = CodeFormer() if backend == "codeformer" else GFPGAN()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)) if v]
        raise UserError(f"the weights do not fit the {_ARCH_NAMES[backend]} architecture: {', '.join(parts)}")
    net.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)


@runtime_checkable
class FaceRestorer(Protocol):
    """Anything that restores aligned faces: ``restorer(faces)`` with ``faces`` ``[B, 3, size, size]`` RGB in
    ``[-1, 1]`` returns a tensor of the same shape and range. ``size`` is the aligned crop side (512 for the FFHQ
    template the published models use); ``name`` is recorded in the image metadata."""

    size: int
    name: str

    def __call__(self, faces: torch.Tensor) -> torch.Tensor: ...


class CodeFormerRestorer:
    """CodeFormer with fidelity ``w`` (0: best quality, 1: closest to the input; the authors use 0.5)."""

    def __init__(self, net: CodeFormer, fidelity: float = 0.5) -> None:
        self.net, self.fidelity = net, float(fidelity)
        self.size = net.img_size
        self.name = f"CodeFormer w={self.fidelity:g}"

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        return self.net(faces, w=self.fidelity, adain=True).clamp(-1, 1)


class GFPGANRestorer:
    """GFPGAN v1.3/v1.4 (no fidelity control: ``fidelity`` is not used by this architecture)."""

    name = "GFPGAN"

    def __init__(self, net: GFPGAN, noise_seed: int = 0) -> None:
        self.net, self.noise_seed = net, noise_seed
        self.size = net.img_size

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        return self.net(faces, noise_seed=self.noise_seed).clamp(-1, 1)


_restorers: dict[tuple, nn.Module] = {}
_restorers_lock = threading.Lock()


def load_restorer(weights: str | Path | None, backend: str = "codeformer", fidelity: float = 0.5) -> FaceRestorer:
    """A :class:`FaceRestorer` from a checkpoint file; the network is cached per process (per file and backend)."""
    if weights is None or str(weights) == "":
        raise UserError("face restoration needs weights: pass --restore-weights PATH (codeformer.pth or "
                        "GFPGANv1.4.pth; magicstudio ships and downloads none)")
    if not 0.0 <= float(fidelity) <= 1.0:
        raise UserError(f"fidelity must be between 0 and 1, got {fidelity}")
    if backend not in RESTORE_BACKENDS:
        raise UserError(f"unknown face restoration backend {backend!r}: use {', '.join(RESTORE_BACKENDS)}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"face restoration weights not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, backend)
    with _restorers_lock:
        if key not in _restorers:
            _restorers[key] = build_network(backend, load_state_dict(path))
        net = _restorers[key]
    return CodeFormerRestorer(net, fidelity) if isinstance(net, CodeFormer) else GFPGANRestorer(net)


def clear_cache() -> None:
    """Forget the cached restoration networks."""
    with _restorers_lock:
        _restorers.clear()


# ----------------------------------------------------------------------------------------------------------------
# Align, restore, paste back
# ----------------------------------------------------------------------------------------------------------------


def ffhq_template(size: int = FACE_SIZE) -> torch.Tensor:
    """The ``[5, 2]`` FFHQ template for a ``size`` crop (facexlib's values at 512)."""
    return torch.tensor(FFHQ_TEMPLATE_512, dtype=torch.float64) * (size / FACE_SIZE)


def face_matrix(landmarks5: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """2x3 similarity (image pixels -> crop pixels) putting ``landmarks5`` (ArcFace order) onto the FFHQ template."""
    from ..models.face_align import similarity_transform

    pts = torch.as_tensor(np.asarray(landmarks5, dtype=np.float64).reshape(5, 2))
    return similarity_transform(pts, ffhq_template(size)).numpy()


def _invert(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def _reduce_for(matrix: np.ndarray) -> int:
    """Integer box-filter factor to apply to the source before a warp that shrinks it: ``floor(1 / scale)``, so the
    remaining bilinear warp scales by 0.5-1 and does not alias (bilinear sampling has no low-pass prefilter)."""
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    return max(1, int(1.0 / scale + 1e-6)) if scale > 0 else 1


def _prereduce(matrix: np.ndarray, k: int) -> np.ndarray:
    """``matrix`` adjusted for a source reduced ``k`` times (point x of the reduced image is k x + (k - 1)/2)."""
    if k == 1:
        return matrix
    lin = matrix[:, :2] * k
    return np.concatenate([lin, (matrix[:, :2] @ np.full(2, (k - 1) / 2) + matrix[:, 2])[:, None]], axis=1)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ``[1, 3, H, W]`` float in ``[-1, 1]``."""
    return torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


def align_face(arr: np.ndarray, matrix: np.ndarray, size: int = FACE_SIZE) -> torch.Tensor:
    """The aligned ``[1, 3, size, size]`` crop in ``[-1, 1]`` (``matrix``: image -> crop pixels); outside the image
    is filled with :data:`CROP_FILL_RGB` like facexlib."""
    from ..models.face_align import warp_affine

    k = _reduce_for(matrix)
    src = np.asarray(Image.fromarray(arr).reduce(k)) if k > 1 else arr
    fill = torch.tensor(CROP_FILL_RGB, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1.0
    img = _to_tensor(src) - fill
    out = warp_affine(img, torch.from_numpy(_prereduce(matrix, k)).float(), size, padding_mode="zeros")
    return out + fill


def feather_mask(size: int = FACE_SIZE, inner: float = 0.1, edge: float = 0.01) -> torch.Tensor:
    """``[1, 1, size, size]`` blend weight in the crop: 0 within ``edge * size`` of the border, rising smoothly to 1
    at ``inner * size`` from it."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    dist = torch.minimum(c, size - c)
    ramp = ((dist - edge * size) / ((inner - edge) * size)).clamp(0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep
    return (ramp[:, None] * ramp[None, :])[None, None]


def paste_face(arr: np.ndarray, restored: torch.Tensor, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend a restored ``[1, 3, S, S]`` crop back into ``arr`` (uint8 RGB) with the inverse of ``matrix`` and a
    feathered mask. Only the face's bounding box is touched. Returns the new array and the ``(H, W)`` float mask."""
    from ..models.face_align import warp_affine

    h, w = arr.shape[:2]
    size = restored.shape[-1]
    inv = _invert(matrix)  # crop pixels -> image pixels
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    pts = corners @ inv[:, :2].T + inv[:, 2]
    x0, y0 = np.maximum(np.floor(pts.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(0)).astype(int) + 2, [w, h])
    out, mask_full = arr.copy(), np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:  # the face lies outside the image
        return out, mask_full
    roi = inv.copy()
    roi[:, 2] -= (x0, y0)  # crop -> ROI pixels
    k = _reduce_for(roi)
    layers = torch.cat([restored.float(), feather_mask(size)], dim=1)  # the mask rides along (0 outside)
    if k > 1:  # shrink the crop first so the face is not aliased when it is much smaller than the crop
        layers = F.avg_pool2d(layers, k, ceil_mode=True)
        roi = _prereduce(roi, k)
    warped = warp_affine(layers, torch.from_numpy(roi).float(), (int(y1 - y0), int(x1 - x0)), padding_mode="zeros")
    face = ((warped[0, :3] + 1) * 127.5).permute(1, 2, 0).numpy()
    mask = warped[0, 3].clamp(0, 1).numpy()
    mask[mask < 1e-4] = 0.0
    patch = arr[y0:y1, x0:x1].astype(np.float32)
    blended = patch + mask[..., None] * (face - patch)
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    mask_full[y0:y1, x0:x1] = mask
    return out, mask_full


@dataclass
class RestoreReport:
    """What :func:`restore_faces` did: the number of faces restored, the restorer, and notes for the user."""

    faces: int = 0
    restorer: str = ""
    notes: list[str] = field(default_factory=list)
    mask: np.ndarray | None = None  # union of the paste masks, (H, W) float in [0, 1]


def restore_faces(
    image: Image.Image,
    weights: str | Path | None = None,
    fidelity: float = 0.5,
    backend: RestoreBackend | str = "codeformer",
    analyzer=None,
    *,
    restorer: FaceRestorer | None = None,
    all_faces: bool = False,
    min_eye_distance: float = 5.0,
    return_report: bool = False,
):
    """Restore the main face (every detected face with ``all_faces``) of ``image``.

    ``weights``: ``codeformer.pth`` / ``GFPGANv1.4.pth`` (or ``.safetensors``); ``backend``: ``codeformer``,
    ``gfpgan`` or ``auto`` (from the key names). ``fidelity`` is CodeFormer's w. ``restorer`` replaces the network
    (any :class:`FaceRestorer`); ``analyzer`` replaces the face finder (a ``FaceAnalyzer``; default Mediapipe).
    Faces with eyes closer than ``min_eye_distance`` pixels are skipped (as GFPGAN does). An image without a face is
    returned unchanged. Returns the image, or ``(image, RestoreReport)`` with ``return_report``.
    """
    if restorer is None:
        restorer = load_restorer(weights, backend, fidelity)
    elif not isinstance(restorer, FaceRestorer):
        raise TypeError("restorer must be callable and have 'size' and 'name' attributes (see FaceRestorer)")
    from ..data.faces import MediapipeFaceAnalyzer, rgb_array

    report = RestoreReport(restorer=getattr(restorer, "name", type(restorer).__name__))
    arr = rgb_array(image)
    own = analyzer is None
    analyzer = MediapipeFaceAnalyzer() if own else analyzer
    try:
        analysis = analyzer.analyze(arr)
    finally:
        if own:
            analyzer.close()
    if analysis.main is None:
        report.notes.append("no face found")
        faces = []
    else:
        faces = list(analysis.faces) if all_faces else [analysis.faces[analysis.main]]
    out = arr
    union = np.zeros(arr.shape[:2], np.float32)
    for face in faces:
        lm = np.asarray(face.landmarks5, dtype=np.float64)
        if float(np.linalg.norm(lm[1] - lm[0])) < min_eye_distance:
            report.notes.append("skipped a face too small to restore")
            continue
        matrix = face_matrix(lm, restorer.size)
        crop = align_face(out, matrix, restorer.size)
        with torch.no_grad():
            fixed = restorer(crop)
        if tuple(fixed.shape) != tuple(crop.shape):
            raise ValueError(f"the restorer returned shape {tuple(fixed.shape)} for {tuple(crop.shape)}")
        out, mask = paste_face(out, fixed.clamp(-1, 1), matrix)
        np.maximum(union, mask, out=union)
        report.faces += 1
    report.mask = union
    if report.faces == 0:
        result = image.copy()
    else:
        result = Image.fromarray(out)
        if image.mode in ("RGBA", "LA"):
            result.putalpha(image.getchannel("A"))
    return (result, report) if return_report else result
