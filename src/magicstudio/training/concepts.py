"""Training images of one concept as tensors, with the augmentations all methods share.

A ``ConceptSet`` holds N images in [-1, 1] at the training resolution with their face masks, 5-point
landmarks and face boxes (from ``magicstudio prepare``). ``augment`` applies the authors' light colour jitter
and horizontal flip, flipping masks, boxes and landmarks consistently (left/right landmarks swap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

# ArcFace 5-point order: left eye, right eye, nose, left mouth, right mouth (image-left first).
FLIP_ORDER = [1, 0, 2, 4, 3]


@dataclass
class ConceptSet:
    images: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    face_masks: torch.Tensor  # (N, 1, R, R) in {0, 1}
    landmarks: torch.Tensor  # (N, 5, 2) pixels at R; NaN where no face
    boxes: torch.Tensor  # (N, 4) xyxy pixels at R; NaN where no face
    names: list[str]
    prepared: Path | None = None  # the prepared folder it was read from (its manifest: crops, other masks)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def has_face(self) -> torch.Tensor:
        return ~torch.isnan(self.boxes[:, 0])

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]


def load_concept(prepared_dir, resolution: int) -> ConceptSet:
    """Read a folder made by ``magicstudio prepare`` at ``resolution``."""
    from PIL import Image

    from ..data.masks import load_mask
    from ..data.prepare import load_prepared

    prepared = load_prepared(prepared_dir)
    if not prepared.items:
        raise UserError(f"{prepared_dir} holds no usable images")
    imgs, masks, lms, boxes, names = [], [], [], [], []
    for item in prepared.items:
        im = Image.open(item.image).convert("RGB")
        scale = resolution / im.width
        im = im.resize((resolution, resolution), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        m = torch.from_numpy((load_mask(item.masks["face"]) > 0).astype(np.float32))[None, None]
        m = F.interpolate(m, size=(resolution, resolution), mode="nearest")[0]
        lm = torch.full((5, 2), float("nan")) if item.landmarks5 is None else torch.tensor(item.landmarks5, dtype=torch.float32) * scale
        bx = torch.full((4,), float("nan")) if item.face_box is None else torch.tensor(item.face_box, dtype=torch.float32) * scale
        imgs.append(arr), masks.append(m), lms.append(lm), boxes.append(bx), names.append(item.stem)
    return ConceptSet(torch.stack(imgs), torch.stack(masks), torch.stack(lms), torch.stack(boxes), names,
                      Path(prepared_dir))


def augment(images: torch.Tensor, masks: torch.Tensor, landmarks: torch.Tensor, boxes: torch.Tensor,
            generator: torch.Generator, hflip: bool = True, jitter: float = 0.1):
    """Colour jitter (brightness and contrast by up to ``jitter``) and a random horizontal flip per sample."""
    images, masks, landmarks, boxes = images.clone(), masks.clone(), landmarks.clone(), boxes.clone()
    n, _, _, width = images.shape
    if jitter > 0:
        b = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter
        c = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter
        x = (images + 1) / 2 * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        images = (((x - mean) * c + mean).clamp(0, 1)) * 2 - 1
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        for i in torch.nonzero(flip).flatten().tolist():
            images[i] = images[i].flip(-1)
            masks[i] = masks[i].flip(-1)
            landmarks[i] = landmarks[i, FLIP_ORDER]
            landmarks[i, :, 0] = (width - 1) - landmarks[i, :, 0]  # pixel centres at integers
            x0, y0, x1, y1 = boxes[i].tolist()
            boxes[i] = torch.tensor([width - x1, y0, width - x0, y1])
    return images, masks, landmarks, boxes
