"""Generation shared by all methods: seeded sampling, A1111-style PNG metadata, attention heatmaps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from ..attention.capture import AttentionStore, install_capture, resize_token_maps, restore_processors, select_layers
from ..errors import UserError

SAMPLER_NAMES = {"ddim": "DDIM", "euler_a": "Euler a", "euler": "Euler", "dpmpp_2m": "DPM++ 2M", "pndm": "PNDM",
                 "ddpm": "DDPM"}


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], n: int, steps: int, size: int, seed: int, guidance: float = 7.5) -> Image.Image:
    """The validation grid: one row of ``n`` images per prompt, every row from the same seed (rows compare)."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        g = torch.Generator().manual_seed(seed)
        images += pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, height=size, width=size,
                       generator=g, guidance_scale=guidance).images
    return image_grid(images, cols=n if len(prompts) > 1 else None)


def a1111_parameters(prompt: str, negative: str, steps: int, sampler: str, guidance: float, seed: int,
                     size: tuple[int, int], model: str, extra: dict | None = None) -> str:
    """The ``parameters`` text chunk A1111 writes (and reads back with 'PNG Info')."""
    fields = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": guidance, "Seed": seed,
              "Size": f"{size[0]}x{size[1]}", "Model": model}
    fields.update(extra or {})
    line = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return f"{prompt}\nNegative prompt: {negative}\n{line}" if negative else f"{prompt}\n{line}"


def check_image_seeds(seed: int, num_images: int) -> None:
    """Images use seeds ``seed .. seed + num_images - 1``: each must fit a torch generator (64 bits)."""
    if not -2**63 <= seed <= 2**64 - num_images:
        raise UserError(f"--seed must be between {-2**63} and {2**64 - num_images} for {num_images} image(s) "
                        f"(got {seed})")


def unused_stem(folder: str | Path, stem: str, files: tuple[str, ...] = ("{}.png",)) -> str:
    """``stem``, else ``stem-2``, ``stem-3``, ...: the first for which none of ``files`` (paths relative to
    ``folder`` with ``{}`` for the stem, e.g. ``"{}-post.png"`` or ``"masks/{}"``) exists."""
    name, n = stem, 1
    while any((Path(folder) / pattern.format(name)).exists() for pattern in files):
        n += 1
        name = f"{stem}-{n}"
    return name


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    from ..io import atomic_write

    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


class AttentionRecorder:
    """Sums the special tokens' cross-attention over layers and denoising steps during a pipeline call.

    Installs capture processors on ``layers``; the unconditional half of the CFG batch gets no tokens.
    ``maps()`` returns per image and token a (latent, latent) heatmap averaged over heads, layers and steps.
    """

    def __init__(self, pipe, token_ids: list[int], layers: str | list[str] = "all"):
        self.pipe, self.token_ids = pipe, token_ids
        self.store = AttentionStore()
        self.layer_names = select_layers(pipe.unet, layers)
        self.sum: torch.Tensor | None = None
        self.count = 0

    def __enter__(self):
        self.previous = install_capture(self.pipe.unet, self.store, self.layer_names)
        return self

    def __exit__(self, *exc):
        restore_processors(self.pipe.unet, self.previous)

    def set_prompt_ids(self, cond_ids: torch.Tensor, n_uncond: int) -> None:
        """``cond_ids``: (B, 77) token ids of the conditional prompts; the batch is [uncond..., cond...]."""
        pos = torch.full((cond_ids.shape[0], len(self.token_ids)), -1, dtype=torch.long)
        for k, tid in enumerate(self.token_ids):
            for b in range(cond_ids.shape[0]):
                hits = (cond_ids[b] == tid).nonzero().flatten()
                if len(hits):
                    pos[b, k] = hits[0]
        self.store.token_index = torch.cat([torch.full((n_uncond, len(self.token_ids)), -1), pos])
        self.n_uncond = n_uncond

    def callback(self, pipe, i, t, kwargs):
        """``callback_on_step_end``: fold this step's maps in and clear the store."""
        if self.store.maps:
            size = max(m.shape[2] for m in self.store.maps.values())
            maps = torch.stack([resize_token_maps(m, size) for m in self.store.maps.values()])  # (L, B, h, S, S, K)
            cur = maps[:, self.n_uncond:].mean(dim=(0, 2)).detach().float()  # (B, S, S, K)
            self.sum = cur if self.sum is None else self.sum + cur
            self.count += 1
        self.store.reset()
        return {}

    def maps(self) -> torch.Tensor:
        return self.sum / max(1, self.count)




def heatmap_overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """Overlay a [0,1]-scaled heatmap (jet-like colours) on ``image`` (the paper's Fig. 3 view)."""
    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min() + 1e-8)
    h = F.interpolate(h[None, None], size=image.size[::-1], mode="bilinear", align_corners=False)[0, 0].numpy()
    r = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    color = (np.stack([r, g, b], -1) * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(color), alpha)
