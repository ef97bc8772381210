"""A tiny world for the MagicTailor tests: a concept (a "person": a disc with its own hair on top) and a component
(the "hair" of another person), as in-memory training sets or as photo folders with user masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from magicstudio.methods.magictailor.masks import TrainingSet
from magicstudio.training.concepts import ConceptSet

CONCEPT_COLOURS = ((40, 60, 200), (200, 30, 30))  # body, hair
COMPONENT_COLOURS = ((30, 160, 40), (230, 220, 40))


def person(size: int, rng: np.random.Generator, body, hair, texture: float = 0.0, hair_texture: float = 0.0):
    """(image uint8 HxWx3, person mask, hair mask): a disc whose top part is hair; ``texture`` / ``hair_texture``
    add a fine high-frequency pattern to the body / the hair (harder to learn)."""
    img = np.full((size, size, 3), 128, np.float32) + rng.uniform(0, 20, (size, size, 3))
    cx = size // 2 + int(rng.integers(-size // 16, size // 16 + 1))
    yy, xx = np.mgrid[:size, :size]
    whole = ((xx - cx) ** 2 + (yy - size * 0.6) ** 2) < (size * 0.3) ** 2
    hair_m = whole & (yy < size * 0.45)
    img[whole] = body
    if texture:
        pattern = np.where(((xx // 2 + yy // 2) % 2) == 0, texture, -texture)[..., None] * np.array([1.0, -1.0, 0.5])
        img = np.where(whole[..., None] & ~hair_m[..., None], img + pattern, img)
    img[hair_m] = hair
    if hair_texture:
        pattern = np.where(((xx // 2 + yy // 2) % 2) == 0, hair_texture, -hair_texture)[..., None] * np.array([1.0, -1.0, 0.5])
        img = np.where(hair_m[..., None], img + pattern, img)
    return np.clip(img, 0, 255).astype(np.uint8), whole, hair_m


def write_folders(root: Path, n_concept: int = 3, n_component: int = 2, size: int = 96, seed: int = 0) -> Path:
    """root/concept, root/component (PNG photos) and root/masks/{person,hair}/<stem>.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("concept", "component", "masks/person", "masks/hair"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for kind, n, (body, hair) in (("concept", n_concept, CONCEPT_COLOURS), ("component", n_component, COMPONENT_COLOURS)):
        for i in range(n):
            img, whole, hair_m = person(size, rng, body, hair)
            stem = f"{kind}{i}"
            Image.fromarray(img).save(root / kind / f"{stem}.png")
            Image.fromarray((whole * 255).astype(np.uint8)).save(root / "masks" / "person" / f"{stem}.png")
            Image.fromarray((hair_m * 255).astype(np.uint8)).save(root / "masks" / "hair" / f"{stem}.png")
    return root


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


def training_sets(size: int = 64, n_concept: int = 3, n_component: int = 2, seed: int = 0,
                  concept_texture: float = 0.0, component_texture: float = 0.0) -> list[TrainingSet]:
    """The concept set (mask: person AND NOT hair) and the component set (mask: hair), in memory; also returns
    each concept image's hair mask as ``sets[0].hair`` (the component region in the concept's images)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, word, n, (body, hair) in (("concept", "person", n_concept, CONCEPT_COLOURS),
                                        ("component_hair", "hair", n_component, COMPONENT_COLOURS)):
        imgs, masks, hairs = [], [], []
        for _ in range(n):
            concept = name == "concept"
            img, whole, hair_m = person(size, rng, body, hair, concept_texture if concept else 0.0,
                                        0.0 if concept else component_texture)
            imgs.append(_tensor(img))
            m = (whole & ~hair_m) if name == "concept" else hair_m
            masks.append(torch.from_numpy(m.astype(np.float32))[None])
            hairs.append(torch.from_numpy(hair_m.astype(np.float32))[None])
        cs = ConceptSet(torch.stack(imgs), torch.zeros(n, 1, size, size), torch.full((n, 5, 2), float("nan")),
                        torch.full((n, 4), float("nan")), [f"{name}{i}" for i in range(n)])
        ts = TrainingSet(name, word, cs, torch.stack(masks))
        ts.hair = torch.stack(hairs)
        out.append(ts)
    return out
