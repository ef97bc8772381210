"""The demo's pictures explain themselves: the overview has row titles, prompts and scores in caption bands;
the attention figure captions each token's share on the face, measured on the map itself."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from magicstudio.cli import demo_figures as fig
from magicstudio.training.figures import outline, panel, share_inside

SUMMARY = {"csim": {"mean": 0.5}, "style": {"mean": 0.25}}


def _tiles(tmp_path, name, n=4, colour=(255, 255, 255)):
    paths = []
    for i in range(n):
        p = tmp_path / f"{name}-{i}.png"
        Image.new("RGB", (64, 64), colour).save(p)
        paths.append(p)
    return paths


def _ink_rows(image: Image.Image) -> np.ndarray:
    """Rows holding any non-white pixel (with white tiles: only text draws ink)."""
    return np.nonzero((np.asarray(image.convert("L")) < 200).any(axis=1))[0]


def test_overview_has_titles_prompts_and_scores(tmp_path):
    kw = dict(person="round face", style="teal", base_prompt="a photo of a person",
              prompt="a photo of a <v1> person in the style of <v2>", base_summary=SUMMARY, summary=SUMMARY)
    groups = [_tiles(tmp_path, n) for n in ("s", "r", "b", "p")]
    image = fig.overview(*groups, **kw)
    grid = 2 * fig.TILE
    assert image.height > grid + 100  # a heading, two title bands and two caption bands
    assert image.width >= 8 * fig.TILE  # base and personalised side by side, 4 tiles each
    rows = _ink_rows(image)
    # text above the first tile row, between the two rows and below the last
    assert rows.min() < 30 and rows.max() > image.height - 40
    unlabelled = fig.arrange([[panel([Image.open(p) for p in g], tile=fig.TILE) for g in groups[:2]],
                              [panel([Image.open(p) for p in g], tile=fig.TILE) for g in groups[2:]]])
    assert len(_ink_rows(unlabelled)) == 0 and image.height > unlabelled.height + 80


def test_scores_are_the_given_ones(tmp_path):
    assert fig._scores(SUMMARY) == "toy-CSIM 0.500, toy-Style 0.250"
    assert fig._scores({"csim": {"mean": None}}) == "toy-CSIM -, toy-Style -"


def test_share_inside_and_the_attention_captions(tmp_path):
    face = np.zeros((64, 64), np.uint8)
    face[16:48, 16:48] = 255  # a quarter of the picture
    on_face = torch.zeros(16, 16)
    on_face[4:12, 4:12] = 1.0
    assert abs(share_inside(on_face.numpy(), face) - 1.0) < 1e-6
    assert abs(share_inside(np.ones((16, 16)), face) - 0.25) < 1e-6
    maps = [torch.stack([on_face, 1 - on_face], -1)]
    picture, shares = fig.attention(_tiles(tmp_path, "g", 1, (128, 128, 128)), maps, ["<v1>", "<v2>"], face)
    assert abs(shares[0][0] - 1.0) < 1e-6 and abs(shares[0][1]) < 1e-6
    assert picture.height > fig.TILE + 40 and picture.width >= 3 * fig.TILE


def test_outline_marks_only_the_boundary():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    out = np.asarray(outline(Image.new("RGB", (8, 8)), mask, (255, 0, 0)))
    red = (out == [255, 0, 0]).all(-1)
    assert red.sum() > 0 and not red[0].any() and not red[4, 4]
