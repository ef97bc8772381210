"""MagicTailor's training masks: concept-image mask = concept AND NOT component; component-image mask = component.

Each image's class-word masks come, in this order, from the user (``DIR/<word>/<stem>.<ext>``, or for the image's
own entity ``DIR/<stem>.<ext>``; drawn on the original photo, same size, ``<stem>`` its file name without the
extension), or from the FaceAnalyzer's masks of the prepared photo for the face classes (face, head, person; hair
= head AND NOT face; ``config.FACE_CLASSES``). A component image whose component has no mask or an empty one is
left out with the reason, as is an image whose user mask has the wrong size; the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ...data.images import Crop, list_images
from ...data.masks import binarize, downsample_mask, load_mask
from ...data.prepare import load_prepared
from ...errors import UserError
from ...training.concepts import ConceptSet
from .config import FACE_CLASSES

log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """One concept or component: its images and their training masks (N, 1, R, R) in {0, 1}."""

    name: str
    word: str
    images: ConceptSet
    masks: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


class UserMasks:
    """``DIR/<stem>.<ext>`` (the image's own entity) and ``DIR/<word>/<stem>.<ext>`` (any class word)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None
        self.index: dict[str | None, dict[str, Path]] = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise UserError(f"--masks {self.root}: {'not a folder' if self.root.exists() else 'folder not found'}")
        self.index[None] = {p.stem: p for p in reversed(list_images(self.root))}
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            self.index[sub.name] = {p.stem: p for p in reversed(list_images(sub))}

    def find(self, word: str, stem: str, own: bool) -> Path | None:
        hit = self.index.get(word, {}).get(stem)
        return hit or (self.index.get(None, {}).get(stem) if own else None)


def _auto(item, word: str) -> np.ndarray | None:
    kind = FACE_CLASSES.get(word.lower())
    if kind is None:
        return None
    if kind == "hair":
        return binarize((item.load_mask("head") > 0) & ~(item.load_mask("face") > 0))
    return item.load_mask(kind)


def _user(path: Path, item, size: int) -> np.ndarray:
    mask = load_mask(path)
    w, h = item.original_size
    if mask.shape != (h, w):
        raise UserError(f"user mask {path} is {mask.shape[1]}x{mask.shape[0]} but the photo is {w}x{h}")
    return Crop(tuple(item.crop_box), (size, size)).apply_mask(mask)


def _mask(item, word: str, own: bool, user: UserMasks, size: int) -> np.ndarray | None:
    path = user.find(word, Path(item.source).stem, own)
    return _user(path, item, size) if path is not None else _auto(item, word)


def build_training_sets(sets: dict[str, ConceptSet], words: dict[str, str], concept: str, masks_dir=None
                        ) -> tuple[list[TrainingSet], list[str]]:
    """The training sets in order (the concept first), each image with its training mask at the training
    resolution, and the reasons images were left out. ``words``: set name -> class word; ``concept``: the name of
    the concept set. UserError (one line) when a set keeps no image."""
    user = UserMasks(masks_dir)
    comp_words = [w for n, w in words.items() if n != concept]
    out, rejected = [], []
    for name in [concept, *[n for n in sets if n != concept]]:
        cs, word, is_concept = sets[name], words[name], name == concept
        prepared = load_prepared(cs.prepared)
        items = {it.stem: it for it in prepared.items}
        keep, masks, reasons = [], [], []
        for i, stem in enumerate(cs.names):
            item = items[stem]
            try:
                own = _mask(item, word, True, user, prepared.size)
                if own is None and is_concept:
                    own = np.full((prepared.size, prepared.size), 255, np.uint8)
                    log.warning("%s: no automatic mask for %r: the whole image is the concept (give --masks)", stem, word)
                if own is None:
                    raise UserError(f"no mask for the component {word!r} (give {user.root or 'DIR'}/{word}/"
                                    f"{Path(item.source).stem}.png with --masks)")
                m = own > 0
                if is_concept:
                    for w in comp_words:  # concept AND NOT component
                        cm = _mask(item, w, False, user, prepared.size)
                        if cm is not None:
                            m &= ~(cm > 0)
                if not m.any():
                    raise UserError(f"the {'concept' if is_concept else 'component'} {word!r} is not found in it"
                                    + (" (nothing left outside the components)" if is_concept and (own > 0).any() else ""))
            except UserError as exc:
                reasons.append(f"{name} image {stem}: {exc}")
                continue
            keep.append(i)
            masks.append(downsample_mask(binarize(m), cs.resolution))
        for r in reasons:
            log.warning("left out: %s", r)
        rejected += reasons
        if not keep:
            raise UserError(f"{name} ({word}): no usable image: " + "; ".join(reasons[:3]))
        idx = torch.tensor(keep)
        subset = replace(cs, images=cs.images[idx], face_masks=cs.face_masks[idx], landmarks=cs.landmarks[idx],
                         boxes=cs.boxes[idx], names=[cs.names[i] for i in keep])
        out.append(TrainingSet(name, word, subset, torch.stack(masks)))
    return out, rejected


def mask_preview(train_sets: list[TrainingSet], thumb: int = 128):
    """Every training image with its training mask tinted (one row per set), as ``prepare``'s preview."""
    from PIL import Image

    from ...data.masks import overlay
    from ...training.sampling import image_grid

    rows = []
    for ts in train_sets:
        for img, m in zip(ts.images.images, ts.masks):
            arr = ((img.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).byte().numpy()
            pic = overlay(Image.fromarray(arr), binarize(m[0].numpy()))
            rows.append(pic.resize((thumb, thumb)))
    return image_grid(rows, cols=max(len(ts) for ts in train_sets))
