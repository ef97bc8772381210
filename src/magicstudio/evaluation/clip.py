"""CLIP and DINO image/text embedders for evaluation, with their preprocessing done in PIL + torch.

No torchvision (it does not install next to CPU torch) and no transformers image processor: the preprocessing
is the one CLIP and DINO were trained with, written out (shortest-side resize, centre crop, ``/255``, per-channel
mean/std), and read from the model folder's ``preprocessor_config.json`` when there is one.

Model specs: ``"tiny"`` (a small random-weight model built from a config, for tests and smoke runs), a local
folder in the transformers layout, or a hub id (used from the local hub cache; this machine has no hub access,
so a missing model is a one-line :class:`UserError` naming what to pass instead).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from ..hub import local_only as _offline
from ..models.dino import IMAGENET_MEAN, IMAGENET_STD, tiny_vit_config  # noqa: F401 - tiny_vit_config re-exported

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH = 8


@dataclass(frozen=True)
class Preprocess:
    """Resize (``size``: int = shortest side, the other side ``int(size * long / short)``; or ``(h, w)`` exactly),
    centre-crop to ``crop`` ``(h, w)`` (top-left at ``(H - h) // 2, (W - w) // 2``, as transformers does), scale to
    ``[0, 1]`` and normalise with ``mean`` / ``std``. Returns ``[B, 3, h, w]`` float32."""

    size: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = int(Image.Resampling.BICUBIC)

    def resize(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = self.size
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), resample=Image.Resampling(self.resample))

    def one(self, img: Image.Image) -> np.ndarray:
        arr = np.asarray(self.resize(img.convert("RGB")), dtype=np.float32)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = arr.shape[:2]
            if ch > h or cw > w:  # only when size < crop: pad like transformers (zeros) then crop
                padded = np.zeros((max(h, ch), max(w, cw), 3), np.float32)
                top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
                padded[top:top + h, left:left + w] = arr
                arr = padded
                h, w = arr.shape[:2]
            top, left = (h - ch) // 2, (w - cw) // 2
            arr = arr[top:top + ch, left:left + cw]
        arr = (arr / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return arr.transpose(2, 0, 1)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.one(im) for im in images]).astype(np.float32))

    @property
    def fill_colour(self) -> tuple[int, int, int]:
        """The neutral colour (the normalisation mean) that normalises to ~0: used to blank out masked regions."""
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]


def preprocess_from_config(cfg: dict, default: Preprocess) -> Preprocess:
    """A :class:`Preprocess` from a transformers ``preprocessor_config.json`` dict (missing keys: ``default``)."""
    size: int | tuple[int, int] = default.size
    if cfg.get("do_resize", True) and "size" in cfg:
        s = cfg["size"]
        if isinstance(s, int):
            # CLIP-style processors resize the shortest side; ViT-style (no centre crop) to a square
            size = s if cfg.get("do_center_crop", False) else (s, s)
        elif isinstance(s, dict) and "shortest_edge" in s:
            size = int(s["shortest_edge"])
        elif isinstance(s, dict) and "height" in s and "width" in s:
            size = (int(s["height"]), int(s["width"]))
    crop: tuple[int, int] | None = default.crop
    if "do_center_crop" in cfg and not cfg["do_center_crop"]:
        crop = None
    elif "crop_size" in cfg:
        c = cfg["crop_size"]
        crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
    mean = tuple(cfg.get("image_mean", default.mean)) if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(cfg.get("image_std", default.std)) if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0)
    resample = int(cfg.get("resample", default.resample))
    return Preprocess(size, crop, mean, std, resample)  # type: ignore[arg-type]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read_preprocessor_config(spec: str) -> dict:
    """The model's ``preprocessor_config.json`` from its folder or the local hub cache; ``{}`` when absent."""
    path = Path(spec) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(spec, "preprocessor_config.json", local_files_only=True))
        except Exception:
            return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _missing(kind: str, spec: str, flag: str, exc: Exception, local: bool = False) -> UserError:
    if local:
        text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return UserError(f"{spec}: no loadable {kind} model in this folder ({exc.__class__.__name__}: {text})")
    if isinstance(exc, OSError):  # what from_pretrained raises for "not cached and no network" / missing files
        reason = "not in the local model cache and the hub is unreachable"
    else:
        text = str(exc).strip()
        reason = f"{exc.__class__.__name__}: {text.splitlines()[0][:120]}" if text else exc.__class__.__name__
    return UserError(
        f"{kind} weights {spec!r} are not available ({reason}); download them once and pass {flag} DIR "
        f"(a transformers folder), or {flag} tiny for a random test model")


def _from_pretrained(cls, spec: str, kind: str, flag: str, **kwargs):
    local = Path(spec).is_dir()
    if not local and (Path(spec).exists() or spec.startswith((".", "/", "~"))):
        raise UserError(f"{kind} model {spec!r}: not a folder of transformers weights")
    try:
        return cls.from_pretrained(spec, local_files_only=not local and _offline(), **kwargs)
    except Exception as exc:  # OSError (not cached / no network), ValueError (wrong architecture), ...
        raise _missing(kind, spec, flag, exc, local) from None


class ClipEmbedder:
    """CLIP image and text embeddings (the projected, L2-normalised features)."""

    def __init__(self, model, preprocess: Preprocess, name: str, tokenizer=None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.name = name
        self._tokenizer = tokenizer
        self.device = next(model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, D]`` unit-length image embeddings."""
        out = []
        for i in range(0, len(images), BATCH):
            pixels = self.preprocess(images[i:i + BATCH]).to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..models.tokenizer import load_clip_tokenizer

            self._tokenizer = load_clip_tokenizer()  # OpenAI's BPE vocabulary, bundled
        return self._tokenizer

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` unit-length text embeddings (prompts truncated to CLIP's 77 tokens)."""
        out = []
        max_len = int(self.model.config.text_config.max_position_embeddings)
        for i in range(0, len(texts), BATCH):
            tok = self.tokenizer(list(texts[i:i + BATCH]), padding="max_length", truncation=True,
                                 max_length=max_len, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device)).pooler_output
            out.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def tiny_clip_config(image_size: int = 64, projection_dim: int = 16):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=37),
        projection_dim=projection_dim,
    )


def load_clip(spec: str | None = None, seed: int = 0) -> ClipEmbedder:
    """CLIP from ``spec``: None -> ViT-L/14 (``openai/clip-vit-large-patch14``); ``"tiny"``; a folder; a hub id;
    ``"toyworld[:PATH]"``: the toy world's style encoder (images only: the Style metric of the toy experiment)."""
    from transformers import CLIPModel

    spec = str(spec or DEFAULT_CLIP)
    if spec == "toyworld" or spec.startswith("toyworld:"):  # the toy world's style encoder (image side only)
        from ..models.toyworld import ToyEmbedder, load_toy_encoders

        return ToyEmbedder("style", load_toy_encoders(spec.partition(":")[2] or None)["style"])
    if spec == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(tiny_clip_config())
        size = model.config.vision_config.image_size
        return ClipEmbedder(model.to(_device()), Preprocess(size, (size, size), CLIP_MEAN, CLIP_STD), "clip-tiny")
    model = _from_pretrained(CLIPModel, spec, "CLIP", "--clip-model")
    size = int(model.config.vision_config.image_size)
    default = Preprocess(size, (size, size), CLIP_MEAN, CLIP_STD)
    preprocess = preprocess_from_config(_read_preprocessor_config(spec), default)
    return ClipEmbedder(model.to(_device()), preprocess, spec, _model_tokenizer(spec))


#: "a photo" in OpenAI's CLIP vocabulary (start, a, photo, end): every CLIP checkpoint's tokenizer gives this
_CLIP_PROBE = [49406, 320, 1125, 49407]


def _model_tokenizer(spec: str):
    """The tokenizer shipped with the model, if it is a working CLIP tokenizer; else None (the bundled one, the
    same vocabulary, is used). transformers returns a silently broken tokenizer for a folder without its files,
    hence the probe."""
    try:
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(spec, local_files_only=not Path(spec).is_dir() and _offline())
        if list(tok("a photo").input_ids) == _CLIP_PROBE:
            return tok
    except Exception:
        pass
    log.info("%s: no usable tokenizer files; using the bundled CLIP vocabulary", spec)
    return None


class DinoEmbedder:
    """DINO (ViT-S/16 by default) ``[CLS]`` features of the last layer, L2-normalised."""

    def __init__(self, model, preprocess: Preprocess, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.name = name
        self.device = next(model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), BATCH):
            pixels = self.preprocess(images[i:i + BATCH]).to(self.device)
            cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(F.normalize(cls.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def load_dino(spec: str | None = None, seed: int = 0) -> DinoEmbedder:
    """DINO from ``spec``: None -> ``facebook/dino-vits16``; ``"tiny"``; a folder or hub id of a ViT or DINOv2."""
    from transformers import AutoConfig, Dinov2Model, ViTModel

    spec = str(spec or DEFAULT_DINO)
    # DINO's own evaluation transform: resize 256 (bicubic), centre crop 224, ImageNet mean/std
    if spec == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ViTModel(tiny_vit_config(), add_pooling_layer=False)
        size = model.config.image_size
        return DinoEmbedder(model.to(_device()), Preprocess(size, (size, size), IMAGENET_MEAN, IMAGENET_STD),
                            "dino-tiny")
    config = _from_pretrained(AutoConfig, spec, "DINO", "--dino-model")
    if config.model_type == "dinov2":
        model = _from_pretrained(Dinov2Model, spec, "DINO", "--dino-model")
    elif config.model_type == "vit":
        model = _from_pretrained(ViTModel, spec, "DINO", "--dino-model", add_pooling_layer=False)
    else:
        raise UserError(f"DINO model {spec!r} is a {config.model_type!r} model; expected a ViT (DINO) or DINOv2")
    size = int(model.config.image_size)
    default = Preprocess(size * 256 // 224, (size, size), IMAGENET_MEAN, IMAGENET_STD)
    return DinoEmbedder(model.to(_device()), preprocess_from_config(_read_preprocessor_config(spec), default), spec)
