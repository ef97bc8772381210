"""Loading user photos robustly, listing them, and cropping with a known geometric mapping.

Point coordinates follow the project's convention (``magicstudio.models.face_align``): ``(x, y)`` pixels with
pixel centres at integers (OpenCV / insightface), so pixel ``(row i, column j)`` is the point ``(j, i)`` and an
image spans ``[-0.5, W - 0.5]``. Crop windows are integer pixel ranges ``[x0, x1) x [y0, y1)``. A
:class:`Crop` maps points from the source image into its output image, so face boxes, landmarks and user
masks follow an image through cropping and resizing.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ..errors import UserError

#: Extensions ``list_images`` picks up. HEIC/HEIF are listed so the user is told they cannot be read,
#: instead of those photos being skipped silently.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif",
     ".heic", ".heif", ".ppm", ".pgm", ".pnm", ".tga", ".qoi", ".mpo"}
)
PadMode = Literal["edge", "reflect", "constant"]
#: Largest image ``open_image`` decodes: real cameras (100 MP is 11648x8736, phones reach 200 MP) pass, while
#: decompression bombs are refused. Pillow's own default guard (~89 MP) would refuse a 100 MP photo.
MAX_PIXELS = 300_000_000
_PILLOW_DEFAULT_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
_PIXEL_LIMIT_LOCK = threading.Lock()
_SRGB = ImageCms.createProfile("sRGB")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), hidden files skipped, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder" if folder.exists() else f"{folder}: folder not found")
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: (p.name.lower(), p.name))


#: The one rule for "which files in an output folder are the generated images": magicstudio writes companion
#: pictures beside them that are no samples: attention heatmaps (``NNN-seedS-attention.png``), MagicFace's
#: segmentation strips (``*-masks.png``), a post-processed copy beside its image (``*-post.png``), MagicFace's
#: reference preview (``references.png``) and ``prepare``'s ``preview.png`` (``-2``, ``-3`` when a name was taken).
#: Matched on the file's stem.
COMPANION_STEM = re.compile(r"(?:-(?:attention|masks|post)|^(?:references|preview)(?:-\d+)?)$")


def is_companion(path: str | os.PathLike) -> bool:
    """True for a companion picture magicstudio writes next to generated images (``COMPANION_STEM``)."""
    return bool(COMPANION_STEM.search(Path(path).stem))


def list_generated(folder: str | os.PathLike) -> list[Path]:
    """The generated images in ``folder``: ``list_images`` without the companion pictures (heatmaps, mask strips,
    post-processed copies, previews). Used by ``evaluate``, ``postprocess`` and every gallery."""
    return [p for p in list_images(folder) if not is_companion(p)]


@contextmanager
def _pixel_limit():
    """Pillow's decompression-bomb guard set to ``MAX_PIXELS`` for the block (yields the limit), then restored.

    An application that lowered ``Image.MAX_IMAGE_PIXELS`` below Pillow's default keeps its stricter limit."""
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        limit = saved if saved is not None and saved < _PILLOW_DEFAULT_PIXELS else MAX_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield limit
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully, upright (EXIF orientation applied), in its own mode.

    Images over ``MAX_PIXELS`` are refused as possible decompression bombs. Every failure (missing, unreadable,
    truncated, not an image, too large) is a ``UserError("<file>: <reason>")``.
    """
    path = Path(path)
    limit = MAX_PIXELS
    try:
        with _pixel_limit() as limit, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # "possibly corrupt EXIF data" and the like
            with Image.open(path) as im:
                im.load()
                try:
                    return ImageOps.exif_transpose(im)  # keeps ``info`` (the ICC profile ``to_rgb`` uses)
                except Exception:  # malformed EXIF: keep the pixels as stored
                    return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow: "Image size (N pixels) exceeds limit of ..."
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise UserError(
            f"{path}: {size}, over the limit of {limit:,}: refused as a possible decompression bomb") from None
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        heic = path.suffix.lower() in {".heic", ".heif"}
        hint = " (HEIC/HEIF photos must be converted to JPEG or PNG first)" if heic else ""
        raise UserError(f"{path}: not an image or an unsupported format{hint}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated file" if "truncated" in str(exc) else f"corrupt or unreadable image ({exc})"
        raise UserError(f"{path}: {reason}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit sRGB ``RGB``.

    Transparency (RGBA, LA, PA, P with a transparent index) is composited on white; 16/32-bit integer
    images are scaled from 0..65535 (when their maximum exceeds 255); float images from 0..1 (when their
    maximum is at most 1) or clipped to 0..255; an embedded ICC profile (CMYK, wide-gamut RGB) is
    converted to sRGB when littleCMS can, otherwise Pillow's plain conversion is used.
    """
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "CMYK"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, profile, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any photo a user may bring and return it upright as 8-bit RGB (see ``open_image``, ``to_rgb``)."""
    im = open_image(path)
    try:
        return to_rgb(im)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unsupported pixel format {im.mode!r} ({exc})") from None


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` points with a 2x3 affine ``matrix`` (OpenCV's forward convention)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


@dataclass(frozen=True)
class Crop:
    """A window ``box = (x0, y0, x1, y1)`` of a source image (integers, may extend past its borders),
    resized to ``out_size = (width, height)``. Parts outside the source are padded."""

    box: tuple[int, int, int, int]
    out_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return self.out_size[0] / (x1 - x0), self.out_size[1] / (y1 - y0)

    @property
    def matrix(self) -> np.ndarray:
        """2x3 affine matrix mapping source points to output points (pixel centres at integers)."""
        sx, sy = self.scale
        return np.array([[sx, 0.0, sx * (0.5 - self.box[0]) - 0.5], [0.0, sy, sy * (0.5 - self.box[1]) - 0.5]])

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map an ``(N, 2)`` array of source points into the output image."""
        return apply_affine(points, self.matrix)

    def map_box(self, box: np.ndarray) -> np.ndarray:
        """Map an ``xyxy`` box into the output image."""
        return self.map_points(np.asarray(box, dtype=np.float64).reshape(2, 2)).reshape(4)

    def shifted_inside(self, width: int, height: int) -> "Crop":
        """The same window moved, along each axis where it fits, to lie inside a ``width x height`` image
        (so it needs no padding there); along an axis where it does not fit it stays where it is."""
        x0, y0, x1, y1 = self.box
        dx = 0 if x1 - x0 > width else max(0, -x0) - max(0, x1 - width)
        dy = 0 if y1 - y0 > height else max(0, -y0) - max(0, y1 - height)
        return Crop((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.out_size)

    def _window(self, arr: np.ndarray, pad: PadMode) -> np.ndarray:
        h, w = arr.shape[:2]
        x0, y0, x1, y1 = self.box
        part = arr[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
        widths = [(max(-y0, 0), max(y1 - h, 0)), (max(-x0, 0), max(x1 - w, 0))] + [(0, 0)] * (arr.ndim - 2)
        if part.size == 0:  # window entirely outside: nothing to replicate
            return np.zeros((y1 - y0, x1 - x0) + arr.shape[2:], dtype=arr.dtype)
        if pad == "reflect" and min(part.shape[:2]) < 2:
            pad = "edge"
        return np.pad(part, widths, mode=pad) if any(a or b for a, b in widths) else part

    def apply(self, image: Image.Image, pad: PadMode = "edge") -> Image.Image:
        """Crop (padding by edge replication, reflection or black) and resize with Lanczos."""
        window = Image.fromarray(self._window(np.asarray(image.convert("RGB")), pad))
        if window.size == self.out_size:
            return window
        return window.resize(self.out_size, Image.Resampling.LANCZOS, reducing_gap=3.0)

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """Crop and resize a ``uint8`` {0,255} mask; outside the source counts as 0; result re-binarised."""
        window = Image.fromarray(self._window(np.asarray(mask, dtype=np.uint8), "constant"))
        if window.size != self.out_size:
            window = window.resize(self.out_size, Image.Resampling.BILINEAR)
        return np.where(np.asarray(window) >= 128, 255, 0).astype(np.uint8)


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def center_crop(width: int, height: int, size: int | tuple[int, int]) -> Crop:
    """The largest centred window of the output aspect ratio, resized to ``size`` (int or ``(w, h)``)."""
    out_w, out_h = _as_size(size)
    scale = min(width / out_w, height / out_h)
    cw, ch = max(1, round(out_w * scale)), max(1, round(out_h * scale))
    x0, y0 = (width - cw) // 2, (height - ch) // 2
    return Crop((x0, y0, x0 + cw, y0 + ch), (out_w, out_h))


def center_crop_resize(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Keep the composition: centre crop to the target aspect ratio and resize."""
    return center_crop(*img.size, size).apply(img)


def square_around(box: np.ndarray | tuple[float, float, float, float], margin: float, size: int) -> Crop:
    """A square window centred on ``box`` with side ``margin * max(box width, box height)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(1, round(max(x1 - x0, y1 - y0) * margin))
    left = round((x0 + x1) / 2 + 0.5 - side / 2)  # +0.5: from pixel-centre to pixel-edge coordinates
    top = round((y0 + y1) / 2 + 0.5 - side / 2)
    return Crop((left, top, left + side, top + side), (size, size))


def crop_square_around(
    img: Image.Image,
    box: np.ndarray | tuple[float, float, float, float],
    margin: float,
    size: int,
    pad: PadMode = "edge",
) -> tuple[Image.Image, Crop]:
    """Square crop centred on a face box, ``margin`` times its larger side, resized to ``size``.

    Where the square leaves the photo it is padded (``"edge"`` replication, ``"reflect"`` or ``"constant"``
    black). Returns the crop and the :class:`Crop` whose ``matrix``/``map_points`` carry boxes, landmarks and
    (with ``apply_mask``) masks into it.
    """
    crop = square_around(box, margin, size)
    return crop.apply(img, pad), crop
