"""Bundled public-domain photos and a deterministic demo data set built from them.

The demo needs one person (the source) and one style (the reference). The astronaut portrait gives the
person: four selfie-like variants (crops, a mirror image, small rotations, light colour changes). Grace
Hopper's portrait, a different person as in the paper's setting, gives the style: four variants of it all
rendered in one coherent look (painterly smoothing, ink outlines, posterised teal/orange grading, paper
grain), so the reference images share a style and not the source's identity.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageChops, ImageEnhance, ImageFilter, ImageOps

from ..io import atomic_write
from .images import load_image

SAMPLE_NAMES = ("astronaut.jpg", "grace_hopper.jpg")


def sample_photos() -> list[Path]:
    """Paths of the bundled portraits: ``astronaut.jpg`` (512x512) and ``grace_hopper.jpg`` (512x600)."""
    root = Path(str(files("magicstudio") / "assets" / "samples"))
    return [root / name for name in SAMPLE_NAMES]


def _rotate_crop(img: Image.Image, degrees: float, keep: float = 0.82) -> Image.Image:
    """Rotate about the centre and keep the central ``keep`` fraction, so no empty corners remain."""
    rotated = img.rotate(degrees, resample=Image.Resampling.BICUBIC)
    w, h = img.size
    cw, ch = int(w * keep), int(h * keep)
    return rotated.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))


def _jitter(img: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(brightness)
    img = ImageEnhance.Contrast(img).enhance(contrast)
    return ImageEnhance.Color(img).enhance(saturation)


def source_variants(photo: Image.Image) -> list[Image.Image]:
    """Four selfie-like variants of one portrait (deterministic)."""
    w, h = photo.size
    return [
        photo,
        _jitter(ImageOps.mirror(photo), 1.06, 1.05, 0.92),
        _jitter(_rotate_crop(photo, 6.0), 0.94, 1.08, 1.1),
        _jitter(ImageOps.mirror(_rotate_crop(photo, -5.0, keep=0.7)), 1.1, 0.95, 1.0)
        .resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.LANCZOS),
    ]


def stylise(img: Image.Image, seed: int = 0) -> Image.Image:
    """The demo's reference style: painterly smoothing, ink outlines, teal/orange poster grading, grain."""
    paint = Image.fromarray(cv2.bilateralFilter(cv2.medianBlur(np.asarray(img.convert("RGB")), 5), 9, 60, 60))
    grey = paint.convert("L").filter(ImageFilter.SMOOTH_MORE)
    edges = grey.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 24 else 0)
    ink = ImageOps.invert(edges.filter(ImageFilter.MaxFilter(3)))
    graded = ImageOps.posterize(ImageEnhance.Color(paint).enhance(1.4), 3)
    r, g, b = graded.split()
    graded = Image.merge("RGB", (
        r.point(lambda v: min(255, int(v * 1.12 + 14))),
        g.point(lambda v: int(v * 0.96 + 8)),
        b.point(lambda v: int(v * 0.8 + 40 * (1 - v / 255))),
    ))
    out = ImageChops.multiply(graded, Image.merge("RGB", (ink, ink, ink)))
    rng = np.random.default_rng(seed)
    grain = rng.normal(0.0, 7.0, (out.height, out.width, 1))
    return Image.fromarray(np.clip(np.asarray(out, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def reference_variants(photo: Image.Image) -> list[Image.Image]:
    """Four differently framed copies of a portrait, all in the demo style (deterministic)."""
    w, h = photo.size
    framings = [
        photo,
        ImageOps.mirror(photo),
        photo.crop((int(w * 0.12), int(h * 0.08), int(w * 0.88), int(h * 0.84))),
        _rotate_crop(ImageOps.mirror(photo), 4.0, keep=0.9),
    ]
    return [stylise(im, seed=i) for i, im in enumerate(framings)]


def _write_set(folder: Path, prefix: str, images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images, start=1):
        atomic_write(folder / f"{prefix}_{i}.jpg", lambda p, im=im: im.save(p, format="JPEG", quality=92))


def make_demo_sets(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write the demo's raw photo folders, ready for ``prepare``: ``out_dir/source_photos`` (4 selfies of
    one person) and ``out_dir/reference_photos`` (4 images in one style). Returns both folders."""
    out = Path(out_dir)
    person, style = (load_image(p) for p in sample_photos())
    source_dir, reference_dir = out / "source_photos", out / "reference_photos"
    _write_set(source_dir, "selfie", source_variants(person))
    _write_set(reference_dir, "style", reference_variants(style))
    return source_dir, reference_dir
