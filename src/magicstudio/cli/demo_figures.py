"""The demo's pictures, each labelled so that it explains itself without the terminal.

- ``overview.png``: the person and the style the model never saw (top), the base model and MagiCapture side by
  side (bottom), each row titled, with its prompt and its toy-CSIM / toy-Style under it.
- ``attention.png``: per generated image, the image and each placeholder token's cross-attention map with the
  face outline on top, captioned with the share of that token's attention on the face (``<v1>`` should sit on the
  face, ``<v2>`` elsewhere: Attention Refocusing, Eq. 8).
- ``magicface.png``: the references with their masks outlined, the result, and the segmentation RBA routed by.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..training.figures import arrange, outline, panel, share_inside
from ..training.sampling import heatmap_overlay

TILE = 112


def _load(paths) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def _scores(summary: dict) -> str:
    def one(name, key):
        s = summary.get(key) or {}
        return f"{name} {s['mean']:.3f}" if s.get("mean") is not None else f"{name} -"

    return f"{one('toy-CSIM', 'csim')}, {one('toy-Style', 'style')}"


def overview(source: list[Path], reference: list[Path], base: list[Path], personalised: list[Path], *,
             person: str, style: str, base_prompt: str, prompt: str, base_summary: dict,
             summary: dict) -> Image.Image:
    """The labelled overview (see the module docstring)."""
    top = [panel(_load(source), "The person <v1> (source pictures, never seen by the model)", person, TILE),
           panel(_load(reference), "The style <v2> (reference pictures, never seen by the model)", style, TILE)]
    bottom = [panel(_load(base), "Base model, not personalised",
                    f'"{base_prompt}"\n{_scores(base_summary)}', TILE),
              panel(_load(personalised), "MagiCapture, personalised",
                    f'"{prompt}"\n{_scores(summary)}', TILE)]
    heading = ("magicstudio demo: MagiCapture in the toy world (64 px). toy-CSIM: how many identity attributes "
               "the image shares with the person; toy-Style: how many style attributes it shares with the "
               "references (1 = all, higher is better).")
    return arrange([top, bottom], heading)


def attention(images: list[Path], maps: list, tokens: list[str], face: np.ndarray) -> tuple[Image.Image, list]:
    """The attention figure and, per image, each token's share of attention on the face."""
    rows, shares = [], []
    for path, heat in zip(images, maps):
        image = Image.open(path).convert("RGB")
        big = image.resize((TILE, TILE), Image.NEAREST)
        tiles = [panel([outline(big, face)], path.stem, "the image (white: the face)", TILE)]
        mine = []
        for k, tok in enumerate(tokens):
            h = heat[..., k].float()
            share = share_inside(h.numpy(), face)
            mine.append(share)
            tiles.append(panel([outline(heatmap_overlay(big, h), face)], f"{tok} attention",
                               f"{share:.0%} of it on the face", TILE))
        rows.append(tiles)
        shares.append(mine)
    mean = np.nanmean(np.array(shares), axis=0)
    heading = ("Where each token looks: cross-attention summed over layers and steps (red: most). "
               + ", ".join(f"{t}: {m:.0%} on the face on average" for t, m in zip(tokens, mean))
               + f" (the face is {float((np.asarray(face) > 0).mean()):.0%} of the picture).")
    return arrange(rows, heading), shares


def magicface(references: list[tuple[str, Path, Path]], results: list[Path], masks: list[Path],
              prompt: str) -> Image.Image:
    """References with their masks outlined, then each result beside the segmentation of its last RBA step."""
    from ..attention.segmentation import PALETTE

    refs = [panel([outline(Image.open(img).convert("RGB").resize((TILE, TILE), Image.NEAREST),
                           np.asarray(Image.open(mask).convert("L")), PALETTE[i % len(PALETTE)], 2)],
                  f"reference '{word}'", "outlined: its mask, in its colour", TILE)
            for i, (word, img, mask) in enumerate(references)]
    rows = [refs]
    for res, seg in zip(results, masks):
        tiles = [panel([Image.open(res).convert("RGB")], res.stem, f'"{prompt}"', TILE)]
        if seg is not None and seg.is_file():
            tiles.append(panel([Image.open(seg).convert("RGB")], "segmentation, last step",
                               "colours: the references' concepts; grey: none", TILE))
        rows.append(tiles)
    return arrange(rows, "MagicFace (training-free): the references' regions (RSA, then RBA by the segmentation)")
