"""Differentiable face alignment: the cropping function B of MagiCapture's identity loss (Eq. 7).

``L_id = 1 - cos(R(B(x0_hat)), R(B(I_s)))`` needs the crop B to be differentiable with respect to the image so the
identity gradient reaches the diffusion model. B here is insightface's ``norm_crop`` (5-point similarity warp onto the
ArcFace 112x112 template, bilinear, black border) rewritten with ``F.affine_grid`` / ``F.grid_sample``.

Conventions (all functions):

* Images are ``[B, C, H, W]`` tensors, normally in ``[-1, 1]``.
* Points are ``(x, y)`` pixel coordinates with **pixel centres at integers** (the OpenCV / insightface convention
  that RetinaFace landmarks and ``cv2.warpAffine`` use): pixel ``(row i, column j)`` is the point ``(x=j, y=i)`` and
  the image spans ``[-0.5, W - 0.5]``. With ``grid_sample(align_corners=False)`` this point has normalised
  coordinate ``x_n = (2x + 1) / W - 1``. A landmark given as a fraction ``f`` of the width (e.g. MediaPipe) is
  ``x = f * W - 0.5`` in this convention.
* Landmark order (insightface / RetinaFace): 0 eye at smaller x (the subject's right eye), 1 the other eye, 2 nose
  tip, 3 mouth corner at smaller x, 4 the other mouth corner.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

# insightface ``arcface_dst``: where the five landmarks sit in a 112x112 ArcFace crop.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

PaddingMode = Literal["black", "zeros", "border", "reflection"]


def arcface_template(size: int = 112, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[5, 2]`` ArcFace template scaled to a ``size`` x ``size`` crop (exact insightface values at 112)."""
    return torch.tensor(ARCFACE_TEMPLATE_112, device=device, dtype=dtype) * (size / 112.0)


def similarity_transform(src_pts: torch.Tensor, dst_pts: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (scale, rotation, translation; no reflection) mapping ``src_pts`` onto ``dst_pts``.

    This is Umeyama (1991) -- what insightface gets from ``skimage.transform.SimilarityTransform.estimate`` -- in
    its 2-D closed form: with ``a = s cos(r)``, ``b = s sin(r)`` the problem is linear, so no SVD is needed and the
    result is smooth in the points. ``src_pts`` / ``dst_pts``: ``[N, 2]`` or ``[B, N, 2]`` (``dst`` may be unbatched
    and is then shared). Returns ``M`` of shape ``[2, 3]`` / ``[B, 2, 3]`` with ``dst ~= M[:, :2] @ src + M[:, 2]``.
    """
    unbatched = src_pts.dim() == 2
    src = src_pts.unsqueeze(0) if unbatched else src_pts
    dst = dst_pts.to(src).expand_as(src)
    src_c = src - src.mean(dim=1, keepdim=True)
    dst_c = dst - dst.mean(dim=1, keepdim=True)
    var = (src_c**2).sum(dim=(1, 2)).clamp_min(torch.finfo(src.dtype).tiny)
    a = (src_c * dst_c).sum(dim=(1, 2)) / var
    b = (src_c[..., 0] * dst_c[..., 1] - src_c[..., 1] * dst_c[..., 0]).sum(dim=1) / var
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # [B, 2, 2] = s * R
    t = dst.mean(dim=1) - (rot @ src.mean(dim=1).unsqueeze(-1)).squeeze(-1)
    matrix = torch.cat([rot, t.unsqueeze(-1)], dim=-1)
    return matrix[0] if unbatched else matrix


def _pixel_to_normalized(height: int, width: int, ref: torch.Tensor) -> torch.Tensor:
    """3x3 homogeneous map: pixel point (centres at integers) -> ``align_corners=False`` grid coordinate."""
    return ref.new_tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]]
    )


def _normalized_to_pixel(height: int, width: int, ref: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pixel_to_normalized`."""
    return ref.new_tensor([[width / 2.0, 0.0, (width - 1) / 2.0], [0.0, height / 2.0, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def warp_affine(
    images: torch.Tensor,
    matrix: torch.Tensor,
    out_size: int | tuple[int, int],
    padding_mode: PaddingMode = "black",
) -> torch.Tensor:
    """Differentiable ``cv2.warpAffine(image, M, (w, h), flags=INTER_LINEAR)`` for a batch.

    ``matrix``: ``[B, 2, 3]`` (or ``[2, 3]``, shared) mapping *input* pixel points to *output* pixel points, the
    OpenCV forward convention. ``out_size``: ``S`` or ``(height, width)``. Bilinear sampling without a low-pass
    prefilter, like OpenCV, so shrink by more than ~2x only after blurring. ``padding_mode="black"`` fills outside the
    image with -1 (black in ``[-1, 1]``, matching insightface's ``borderValue=0``); the others are ``grid_sample``'s.
    Gradients flow to ``images`` (and to ``matrix``).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    batch, _, in_h, in_w = images.shape
    work = torch.promote_types(matrix.dtype, torch.float32)
    m = matrix.to(work).expand(batch, 2, 3) if matrix.dim() == 2 else matrix.to(work)
    inv_lin = torch.linalg.inv(m[:, :, :2])
    inv = torch.cat([inv_lin, -(inv_lin @ m[:, :, 2:])], dim=-1)  # output pixel -> input pixel
    inv = torch.cat([inv, inv.new_tensor([0.0, 0.0, 1.0]).expand(batch, 1, 3)], dim=1)
    theta = _pixel_to_normalized(in_h, in_w, inv) @ inv @ _normalized_to_pixel(out_h, out_w, inv)
    grid = F.affine_grid(theta[:, :2], [batch, images.shape[1], out_h, out_w], align_corners=False)
    grid = grid.to(images.dtype)
    if padding_mode == "black":
        return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def alignment_matrix(landmarks5: torch.Tensor, size: int = 112) -> torch.Tensor:
    """``[B, 2, 3]`` similarity taking ``[B, 5, 2]`` image landmarks onto the ArcFace template of a ``size`` crop."""
    if landmarks5.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks5 must be [B, 5, 2], got shape {tuple(landmarks5.shape)}")
    work = torch.promote_types(landmarks5.dtype, torch.float32)
    return similarity_transform(landmarks5.to(work), arcface_template(size, landmarks5.device, work))


def align_faces(
    images: torch.Tensor,
    landmarks5: torch.Tensor,
    size: int = 112,
    padding_mode: PaddingMode = "black",
) -> torch.Tensor:
    """B(x) of Eq. 7: warp each face onto the ArcFace template, ``[B, 3, H, W] -> [B, 3, size, size]``.

    ``landmarks5``: ``[B, 5, 2]`` pixel points of ``images`` (conventions in the module docstring). At ``size=112``
    this reproduces insightface ``norm_crop`` (``estimate_norm`` + ``cv2.warpAffine``); other sizes scale the
    template uniformly. Differentiable with respect to ``images``.
    """
    return warp_affine(images, alignment_matrix(landmarks5, size), size, padding_mode)


def align_from_box(
    images: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    size: int = 112,
    scale: float = 1.0,
    padding_mode: PaddingMode = "black",
) -> torch.Tensor:
    """Fallback B when only a face box is known: square crop around each box, resized to ``size``.

    ``boxes_xyxy``: ``[B, 4]`` as ``(x1, y1, x2, y2)`` in the same pixel convention as landmarks. The crop is
    centred on the box centre with side ``scale * max(box width, box height)``; its outer pixel edges are at
    ``centre +- side / 2``. No rotation is corrected, so embeddings are less reliable than with :func:`align_faces`.
    """
    if boxes_xyxy.dim() != 2 or boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"boxes_xyxy must be [B, 4], got shape {tuple(boxes_xyxy.shape)}")
    boxes = boxes_xyxy.to(torch.promote_types(boxes_xyxy.dtype, torch.float32))
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * scale
    if bool((side <= 0).any()):
        raise ValueError("every box needs x2 > x1 or y2 > y1")
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    k = size / side
    shift = centre * -k.unsqueeze(-1) + (size / 2 - 0.5)  # output = k * (input - centre) + S/2 - 1/2
    zero = torch.zeros_like(k)
    matrix = torch.stack(
        [torch.stack([k, zero, shift[:, 0]], -1), torch.stack([zero, k, shift[:, 1]], -1)], dim=1
    )
    return warp_affine(images, matrix, size, padding_mode)
