"""MagiCapture's optional post-processing: super-resolution, then face restoration on the enlarged image.

The paper runs "a pretrained super-resolution model [Real-ESRGAN] and a face restoration model [CodeFormer]"; the
authors' setting is CodeFormer with fidelity 0.5 and 2x upscaling, Real-ESRGAN optional. Here:

* :func:`upscale` -- Real-ESRGAN x4plus (``pip install 'magicstudio[upscale]'``, CPU or Vulkan GPU) or Lanczos;
* :func:`restore_faces` -- CodeFormer or GFPGAN from the user's checkpoint (none ship), or any :class:`FaceRestorer`;
* :func:`postprocess` -- both, in the authors' order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .restore import (
    CodeFormer,
    CodeFormerRestorer,
    FaceRestorer,
    GFPGAN,
    GFPGANRestorer,
    RestoreReport,
    load_restorer,
    restore_faces,
)
from .upscale import SR_BACKENDS, best_sr_backend, realesrgan_status, upscale

__all__ = [
    "CodeFormer", "CodeFormerRestorer", "FaceRestorer", "GFPGAN", "GFPGANRestorer", "PostprocessReport",
    "RestoreReport", "SR_BACKENDS", "best_sr_backend", "load_restorer", "postprocess", "realesrgan_status", "restore_faces", "upscale",
]


@dataclass
class PostprocessReport:
    """What :func:`postprocess` did, and the one-line summary written into the PNG metadata."""

    upscale_factor: int = 1
    sr_backend: str = ""
    restore: RestoreReport | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.upscale_factor != 1:
            sr = "Real-ESRGAN x4plus" if self.sr_backend == "realesrgan" else "Lanczos"
            parts.append(f"{sr} x{self.upscale_factor}")
        if self.restore is not None:
            faces = self.restore.faces
            parts.append(f"{self.restore.restorer} ({faces} face{'s' if faces != 1 else ''})")
        return ", ".join(parts) if parts else "none"


def postprocess(
    image: Image.Image,
    upscale_factor: int = 2,
    restore_weights: str | Path | None = None,
    fidelity: float = 0.5,
    sr_backend: str = "realesrgan",
    *,
    restore_backend: str = "auto",
    restorer: FaceRestorer | None = None,
    analyzer=None,
    all_faces: bool = False,
    device: str | int = "auto",
    return_report: bool = False,
):
    """Upscale ``image`` by ``upscale_factor`` (``sr_backend``: ``realesrgan`` or ``lanczos``), then restore its
    faces when ``restore_weights`` (or a ``restorer``) is given -- on the upscaled image, as the authors do.

    Without weights only the upscaling runs. Returns the image, or ``(image, PostprocessReport)``.
    """
    report = PostprocessReport(upscale_factor=int(upscale_factor), sr_backend=sr_backend)
    if restorer is None and restore_weights is not None:  # fail on bad weights before the slow upscaling
        restorer = load_restorer(restore_weights, restore_backend, fidelity)
    out = upscale(image, int(upscale_factor), sr_backend, device=device)
    if restorer is not None:
        out, report.restore = restore_faces(out, restorer=restorer, analyzer=analyzer, all_faces=all_faces,
                                            return_report=True)
        report.notes += report.restore.notes
    return (out, report) if return_report else out
