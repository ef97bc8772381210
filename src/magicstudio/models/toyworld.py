"""The toy world's models: a small text-to-image latent diffusion model and the toy identity / style encoders.

The LDM has Stable Diffusion's classes and layout at toy size (``AutoencoderKL`` with a 4x downscale and 4 latent
channels, a four-level ``UNet2DConditionModel`` with cross-attention on three levels, a ``CLIPTextModel`` with the
real CLIP BPE tokenizer) for 64x64 pictures. It is trained from scratch on the toy world by
``magicstudio toyworld pretrain`` and ships (fp16, ~4 MB) in ``magicstudio/assets/toyworld/``; ``load_base("toyworld")``
loads it. Only the token-embedding rows the world's captions use are stored: every other row is the fixed
initial value (a numpy-seeded normal, the same on every machine), which training never changes.

The encoders are small CNNs trained on the world's labels (``experiments/toyworld/pretrain.py``):

- ``identity``: the fixed head window of a picture -> the six identity attributes (CSIM of the toy world);
- ``face``: a face aligned to ArcFace's 112x112 template -> the same attributes, as a :class:`FaceEncoder` for
  MagiCapture's identity loss (a different network from the one that scores CSIM, as in the paper);
- ``style``: the picture with the fixed head window blanked -> pattern, palette, clothes (Style metric).

Embeddings concatenate the per-attribute softmax distributions (each scaled by ``1/sqrt(K)``), so the cosine of
two confident embeddings is the share of attributes they agree on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.toyworld import HEAD_WINDOW
from ..errors import UserError
from ..io import save_tensors
from .components import Components
from .face_encoder import FaceEncoder
from .tiny import SCHEDULER_CONFIG
from .tokenizer import load_clip_tokenizer

RESOLUTION = 64
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
LDM_FILE = "ldm.safetensors"
ENCODERS_FILE = "encoders.safetensors"

UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 48, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,  # = the text width (set by build_toyworld)
    attention_head_dim=4,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=RESOLUTION,
    scaling_factor=1.0,  # set from the trained encoder's latent spread by pretraining
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,  # the first model's text width; build_toyworld(text_width=...) sets it
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=64,
)
EMBEDDING_INIT_STD = 0.02
TEXT_WIDTH = 128  # text-encoder width (= the UNet's cross-attention width) of newly pretrained models
FIRST_TEXT_WIDTH, FIRST_HELD_OUT = 64, 6  # model files without this metadata (the first shipped model)


def text_config(width: int = TEXT_WIDTH) -> dict:
    """:data:`TEXT_CONFIG` at text width ``width`` (4 heads, MLP 4x)."""
    return {**TEXT_CONFIG, "hidden_size": width, "intermediate_size": 4 * width, "projection_dim": width}


def initial_token_embedding(seed: int = 0, width: int = TEXT_WIDTH) -> torch.Tensor:
    """The token table before training, from numpy's PCG64 (identical on every platform and torch version)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((TEXT_CONFIG["vocab_size"], width), dtype=np.float32)
    return torch.from_numpy(table * EMBEDDING_INIT_STD)


def build_toyworld(seed: int = 0, scaling_factor: float = 1.0, text_width: int = TEXT_WIDTH) -> Components:
    """The toy LDM with fresh weights (the starting point of pretraining)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**UNET_CONFIG, "cross_attention_dim": text_width})
        vae = AutoencoderKL(**{**VAE_CONFIG, "scaling_factor": scaling_factor})
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(text_width)))
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.copy_(initial_token_embedding(seed, text_width))
    for m in (unet, vae, text_encoder):
        m.eval()
    return Components(tokenizer=load_clip_tokenizer(), text_encoder=text_encoder, vae=vae, unet=unet,
                      scheduler=DDPMScheduler.from_config(SCHEDULER_CONFIG), source="toyworld",
                      resolution=RESOLUTION, family="sd1", extra={"seed": seed})


def save_toyworld(comps: Components, path: str | os.PathLike, used_token_ids: list[int], seed: int = 0) -> Path:
    """Write the trained LDM compactly: fp16, token-embedding rows ``used_token_ids`` only (the rest must still
    equal :func:`initial_token_embedding`, which is checked)."""
    ids = torch.tensor(sorted(set(used_token_ids)), dtype=torch.long)
    table = comps.text_encoder.get_input_embeddings().weight.detach().float()
    width = table.shape[1]
    init = initial_token_embedding(seed, width)
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[ids] = False
    if not torch.equal(table[keep], init[keep]):
        raise ValueError("token-embedding rows outside used_token_ids changed in training; cannot store sparsely")
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("unet.", comps.unet), ("vae.", comps.vae), ("text_encoder.", comps.text_encoder)):
        for k, v in module.state_dict().items():
            if k.endswith("token_embedding.weight") or k.endswith("position_ids"):
                continue
            state[prefix + k] = v.detach().to(torch.float16).contiguous()
    state["token_rows.ids"] = ids
    state["token_rows.values"] = table[ids].to(torch.float16).contiguous()
    from ..data.toyworld import N_HELD_OUT

    return save_tensors(path, state, metadata={"format": "magicstudio-toyworld-ldm", "seed": str(seed),
                                               "scaling_factor": repr(float(comps.vae.config.scaling_factor)),
                                               "text_width": str(width), "held_out": str(N_HELD_OUT)})


def toyworld_weights(name: str = LDM_FILE) -> Path:
    """Where the toy world's trained weights are (``$MAGICSTUDIO_TOYWORLD`` overrides the packaged folder)."""
    root = Path(os.environ.get("MAGICSTUDIO_TOYWORLD", ASSETS))
    return root / name


def held_out_pairs(path: str | os.PathLike | None = None) -> int:
    """How many of the world's held-out (identity, style) pairs the model file never saw in pretraining (the
    first ``held_out`` of ``data.toyworld.HELD_OUT_*``; read from its metadata, without loading the weights)."""
    from safetensors import safe_open

    path = Path(path) if path else toyworld_weights()
    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {}).get("held_out", FIRST_HELD_OUT))


def load_toyworld(path: str | os.PathLike | None = None, dtype: torch.dtype | None = None) -> Components:
    """The trained toy LDM (``magicstudio toyworld pretrain`` writes it)."""
    from safetensors import safe_open

    path = Path(path) if path else toyworld_weights()
    if not path.is_file():
        raise UserError(f"the toy-world model is not trained yet ({path} missing): run `magicstudio toyworld pretrain`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "magicstudio-toyworld-ldm":
        raise UserError(f"{path} is not a toy-world model file")
    seed = int(meta.get("seed", 0))
    width = int(meta.get("text_width", FIRST_TEXT_WIDTH))
    comps = build_toyworld(seed, float(meta.get("scaling_factor", 1.0)), width)
    for prefix, module in (("unet.", comps.unet), ("vae.", comps.vae), ("text_encoder.", comps.text_encoder)):
        sub = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sub, strict=False)
        missing = [m for m in missing if not m.endswith(("token_embedding.weight", "position_ids"))]
        if missing or unexpected:
            raise UserError(f"{path}: does not match the toy-world architecture ({(missing + unexpected)[0]})")
    with torch.no_grad():
        comps.text_encoder.get_input_embeddings().weight[state["token_rows.ids"]] = state["token_rows.values"].float()
    comps.source = str(path)
    # how many of data.toyworld's held-out pairs this model never saw (the first model: the first six)
    comps.extra = {"seed": seed, "toyworld": True, "held_out": int(meta.get("held_out", FIRST_HELD_OUT))}
    return comps.to(dtype=dtype) if dtype is not None else comps


# --------------------------------------------------------------------------------------------------------------
# Toy encoders
# --------------------------------------------------------------------------------------------------------------

class AttributeNet(nn.Module):
    """Small CNN: image in [-1, 1] -> one logit vector per attribute. ``pool="max"`` (global max pooling) keeps
    few-pixel details such as eye colour from being averaged away."""

    def __init__(self, classes: list[int], width: int = 32, pool: str = "avg") -> None:
        super().__init__()
        w = width
        self.classes, self.width, self.pool = list(classes), width, pool
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(4 * w, c) for c in classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x)
        return [head(h) for head in self.heads]


def attribute_embedding(logits: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated per-attribute softmax distributions, L2-normalised (cosine = attribute agreement)."""
    parts = [F.softmax(z, dim=-1) / len(logits) ** 0.5 for z in logits]
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)


def to_model_input(images: list | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL images / uint8 arrays [N, H, W, 3] -> float [N, 3, 64, 64] in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images
    arrs = []
    for im in images:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.shape[:2] != (RESOLUTION, RESOLUTION):
            from PIL import Image

            a = np.asarray(Image.fromarray(a).resize((RESOLUTION, RESOLUTION), Image.BICUBIC))
        arrs.append(a)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def identity_input(x: torch.Tensor) -> torch.Tensor:
    """The head window of 64x64 pictures (what the identity encoder sees)."""
    return x[:, :, HEAD_WINDOW[0], HEAD_WINDOW[1]]


def style_input(x: torch.Tensor) -> torch.Tensor:
    """64x64 pictures with the head window set to 0 (mid grey): the style encoder never sees a face."""
    x = x.clone()
    x[:, :, HEAD_WINDOW[0], HEAD_WINDOW[1]] = 0.0
    return x


def encoder_input(kind: str, x: torch.Tensor) -> torch.Tensor:
    """What encoder ``kind`` reads: ``identity`` / ``style`` take 64x64 pictures, ``face`` takes ArcFace-aligned
    112x112 crops (read at 56x56)."""
    if kind == "identity":
        return identity_input(x)
    if kind == "style":
        return style_input(x)
    if kind == "face":
        return F.avg_pool2d(x, 2)
    raise ValueError(f"unknown toy encoder {kind!r}")


class ToyEmbedder:
    """An evaluation embedder over whole pictures (``identity`` or ``style``), the interface
    ``magicstudio.evaluation`` uses for CLIP-like models: ``image_embeddings(images) -> [N, D]``, ``dim``,
    ``preprocess.fill_colour`` (the neutral colour masked regions are filled with)."""

    class _Pre:
        fill_colour = (128, 128, 128)

    def __init__(self, kind: str, net: AttributeNet) -> None:
        self.kind, self.net = kind, net.eval()
        self.name = f"toyworld-{kind}"
        self.preprocess = self._Pre()
        self.dim = sum(net.classes)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        return attribute_embedding(self.net(encoder_input(self.kind, to_model_input(images))))

    @torch.no_grad()
    def predict(self, images) -> list[torch.Tensor]:
        return [z.argmax(-1) for z in self.net(encoder_input(self.kind, to_model_input(images)))]


class ToyFaceEncoder(FaceEncoder):
    """The toy world's face-recognition network for the identity loss: ArcFace-aligned 112x112 faces (downscaled
    to 56x56 inside) -> attribute embedding. Frozen, differentiable in its input."""

    def __init__(self, net: AttributeNet) -> None:
        super().__init__()
        self.net = net
        self.name = "toyworld-face"
        self.embedding_dim = sum(net.classes)
        self._freeze()

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        if aligned.dim() != 4 or tuple(aligned.shape[1:]) != (3, 112, 112):
            raise ValueError(f"{self.name} expects aligned faces [B, 3, 112, 112], got {tuple(aligned.shape)}")
        p = next(self.net.parameters())
        return attribute_embedding(self.net(encoder_input("face", aligned.to(device=p.device, dtype=p.dtype))))


def load_toy_encoders(path: str | os.PathLike | None = None) -> dict[str, AttributeNet]:
    """``{"identity", "face", "style"}`` attribute networks from the packaged (or given) file."""
    from safetensors import safe_open

    path = Path(path) if path else toyworld_weights(ENCODERS_FILE)
    if not path.is_file():
        raise UserError(f"the toy-world encoders are not trained yet ({path} missing): run `magicstudio toyworld pretrain`")
    nets = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        for kind in ("identity", "face", "style"):
            classes = [int(c) for c in meta[f"{kind}.classes"].split(",")]
            net = AttributeNet(classes, width=int(meta.get(f"{kind}.width", 32)), pool=meta.get(f"{kind}.pool", "avg"))
            net.load_state_dict({k[len(kind) + 1:]: f.get_tensor(k).float() for k in keys if k.startswith(kind + ".")})
            nets[kind] = net.eval()
    return nets


def save_toy_encoders(nets: dict[str, AttributeNet], path: str | os.PathLike) -> Path:
    state, meta = {}, {"format": "magicstudio-toyworld-encoders"}
    for kind, net in nets.items():
        meta[f"{kind}.classes"] = ",".join(map(str, net.classes))
        meta[f"{kind}.width"] = str(net.width)
        meta[f"{kind}.pool"] = net.pool
        state.update({f"{kind}.{k}": v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()})
    return save_tensors(path, state, metadata=meta)
