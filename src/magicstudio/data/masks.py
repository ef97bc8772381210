"""Mask utilities shared by every method.

Mask format everywhere in magicstudio's data layer: a ``numpy.uint8`` array of shape ``(H, W)`` holding
only 0 (outside) and 255 (inside), the same size as its image. ``binarize`` turns bool, {0,1}, float or
greyscale masks into that format; ``to_tensor_mask``/``downsample_mask`` produce float tensors in [0, 1]
for losses.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..errors import UserError
from .images import open_image


def binarize(mask: np.ndarray | torch.Tensor, threshold: float | None = None) -> np.ndarray:
    """Any mask (bool, {0,1}, [0,1] float, 0..255) -> ``uint8`` {0,255}.

    ``threshold`` defaults to 0.5 for values in [0, 1] and to 128 otherwise.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype == bool:
        return np.where(arr, 255, 0).astype(np.uint8)
    if threshold is None:
        threshold = 0.5 if arr.size and float(arr.max()) <= 1.0 else 128
    return np.where(arr >= threshold, 255, 0).astype(np.uint8)


def empty_mask(height: int, width: int) -> np.ndarray:
    """An all-zero mask of the given size."""
    return np.zeros((height, width), dtype=np.uint8)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a user's mask file: its alpha channel when it has a non-uniform one, else its brightness >= 128."""
    im = open_image(path)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if alpha.min() != alpha.max():
            return binarize(alpha, 128)
    try:
        grey = np.asarray(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unsupported mask format {im.mode!r} ({exc})") from None
    return binarize(grey, 128)


def save_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a mask as an 8-bit greyscale PNG (0/255)."""
    Image.fromarray(binarize(mask), "L").save(path, format="PNG")


def to_tensor_mask(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(H, W)`` mask -> float tensor ``(1, H, W)`` with values in {0, 1}."""
    return torch.from_numpy(binarize(mask).astype(np.float32) / 255.0).unsqueeze(0)


def downsample_mask(
    mask: np.ndarray | torch.Tensor, size: int | tuple[int, int], mode: Literal["nearest", "area"] = "nearest"
) -> torch.Tensor:
    """Resize a mask to latent resolution ``size`` (int or ``(h, w)``) as a float tensor in [0, 1].

    ``"nearest"`` keeps it binary (what the MagiCapture authors do for their losses); ``"area"`` gives the
    fraction of each latent cell covered. A numpy mask becomes ``(1, h, w)``; a tensor keeps its leading
    dimensions (``(..., H, W)`` -> ``(..., h, w)``) and is assumed to hold values in [0, 1] already.
    """
    if mode not in ("nearest", "area"):
        raise ValueError(f"mode must be 'nearest' or 'area', not {mode!r}")
    out = (size, size) if isinstance(size, int) else tuple(size)
    t = to_tensor_mask(mask) if not isinstance(mask, torch.Tensor) else mask.float()
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, *t.shape[-2:])
    resized = F.interpolate(flat, size=out, mode=mode)
    return resized.reshape(*lead, *out)


def _kernel(px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Grow a mask by ``px`` pixels (elliptical structuring element)."""
    return binarize(mask) if px <= 0 else cv2.dilate(binarize(mask), _kernel(px))


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Shrink a mask by ``px`` pixels (elliptical structuring element)."""
    if px <= 0:
        return binarize(mask)
    return cv2.erode(binarize(mask), _kernel(px), borderType=cv2.BORDER_CONSTANT, borderValue=0)


def overlay(
    image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (0, 200, 80), alpha: float = 0.45,
    outline: bool = False, width: int = 2,
) -> Image.Image:
    """Preview: tint the mask area with ``color`` (or, with ``outline=True``, draw only its contour)."""
    base = image.convert("RGB")
    m = binarize(mask)
    if m.shape != (base.height, base.width):
        raise ValueError(f"mask {m.shape[::-1]} and image {base.size} differ in size")
    if outline:
        out = np.asarray(base).copy()
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), max(1, width))
        return Image.fromarray(out)
    tint = Image.new("RGB", base.size, color)
    return Image.composite(Image.blend(base, tint, alpha), base, Image.fromarray(m, "L"))


@dataclass(frozen=True)
class MaskStats:
    """``area``: fraction of the image inside the mask; ``bbox``: ``(x0, y0, x1, y1)`` or None when empty."""

    area: float
    bbox: tuple[int, int, int, int] | None

    def to_dict(self) -> dict:
        return asdict(self)


def mask_stats(mask: np.ndarray) -> MaskStats:
    """Area fraction and bounding box (exclusive ``x1, y1``) of a mask."""
    m = binarize(mask) > 0
    if not m.any():
        return MaskStats(0.0, None)
    ys, xs = np.nonzero(m)
    return MaskStats(round(float(m.mean()), 6), (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill the convex hull of ``(N, 2)`` points (pixel centres at integers) into a mask of the given size."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mask = empty_mask(height, width)
    if len(pts) >= 3:
        hull = cv2.convexHull(np.round(pts * 16).astype(np.int32))  # 4 fractional bits
        cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=4)
    return mask


def ellipse_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """The ellipse inscribed in an ``xyxy`` box: a rough face region when no face mesh is available."""
    x0, y0, x1, y1 = (float(v) for v in box)
    im = Image.new("L", (width, height), 0)
    ImageDraw.Draw(im).ellipse([x0, y0, x1, y1], fill=255)
    return np.asarray(im).copy()
