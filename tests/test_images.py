"""Robust photo loading, crops with their point mapping, and mask utilities (no face models needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from magicstudio.data.images import Crop, center_crop, center_crop_resize, crop_square_around, list_images, load_image
from magicstudio.data.masks import (
    binarize, dilate, downsample_mask, erode, load_mask, mask_stats, overlay, to_tensor_mask,
)
from magicstudio.data.samples import make_demo_sets, sample_photos
from magicstudio.errors import UserError


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    _halves(80, 40).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.mode == "RGB" and img.size == (40, 80)
    top, bottom = np.asarray(img)[5, 20], np.asarray(img)[74, 20]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 9]) == (255, 255, 255)

    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 5, 10))
    pal.save(tmp_path / "p.png", transparency=0)
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(arr[0, 0]) == (0, 255, 0) and tuple(arr[0, 9]) == (255, 255, 255)

    la = Image.fromarray(np.dstack([np.full((4, 4), 30, np.uint8), np.zeros((4, 4), np.uint8)]), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)


def test_cmyk_grey_and_deep_images_become_8bit_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg"))[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60

    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "l.png")
    assert tuple(np.asarray(load_image(tmp_path / "l.png"))[0, 0]) == (77, 77, 77)

    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    arr = np.asarray(load_image(tmp_path / "deep.png"))
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 3)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255 and np.all(np.diff(arr[..., 0].ravel().astype(int)) >= 0)

    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, 0, 0] in (127, 128)


def test_bad_files_are_user_errors_with_a_reason(tmp_path):
    good = sample_photos()[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "notes.jpg").write_text("not a photo at all\n")
    cases = {"cut.jpg": "truncated", "notes.jpg": "not an image", "missing.png": "not found"}
    for name, reason in cases.items():
        with pytest.raises(UserError) as err:
            load_image(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name) + ": ") and reason in message and "\n" not in message


@pytest.mark.parametrize("side", [40, 64])  # 1600 px: Pillow's warning range; 4096 px: its error range
def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch, side):
    Image.new("RGB", (side, side), "white").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_list_images_sorted_skips_hidden_and_other_files(tmp_path):
    for name in ["b.JPG", "a.png", ".hidden.jpg", "notes.txt", "c.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    with pytest.raises(UserError, match="not found"):
        list_images(tmp_path / "nope")


def test_center_crop_keeps_composition():
    img = _halves(300, 100)
    out = center_crop_resize(img, 64)
    assert out.size == (64, 64)
    assert center_crop(300, 100, 64).box == (100, 0, 200, 100)
    assert center_crop(100, 300, (50, 100)).box == (0, 50, 100, 250)


def test_square_crop_maps_points_and_pads():
    arr = np.zeros((100, 120, 3), np.uint8)
    arr[30, 40] = (255, 255, 255)  # a marker pixel at the point (40, 30)
    arr[:, -1] = (0, 200, 0)  # right edge column, to check edge replication
    img = Image.fromarray(arr)
    out, crop = crop_square_around(img, (70, 20, 110, 60), margin=2.0, size=160)
    assert out.size == (160, 160) and crop.box == (50, 0, 130, 80)  # leaves the photo on the right
    x, y = crop.map_points(np.array([[40.0, 30.0]]))[0]
    assert x < 0  # the marker lies left of this window
    window = np.asarray(out)
    assert window[80, -1, 1] > 150 and window[80, -1, 0] < 50  # padded by replicating the green edge
    # a window containing the marker puts it where the mapping says
    out, crop = crop_square_around(img, (30, 20, 50, 40), margin=2.0, size=80, pad="reflect")
    x, y = np.round(crop.map_points([[40, 30]])[0]).astype(int)
    assert np.asarray(out)[y - 1:y + 2, x - 1:x + 2].max() > 100
    box = crop.map_box([30, 20, 50, 40])  # scaled 2x, centred to within one output pixel
    assert np.allclose(box[2:] - box[:2], [40, 40]) and np.all(np.abs((box[:2] + box[2:]) / 2 - 39.5) <= 1)


def test_crop_masks_outside_is_zero_and_shift_inside():
    mask = np.full((50, 50), 255, np.uint8)
    crop = Crop((-25, -25, 25, 25), (100, 100))
    out = crop.apply_mask(mask)
    assert out.shape == (100, 100) and set(np.unique(out)) <= {0, 255}
    assert out[:50, :50].max() == 0 and out[50:, 50:].min() == 255
    assert crop.shifted_inside(50, 50).box == (0, 0, 50, 50)
    assert Crop((-10, 5, 70, 85), (8, 8)).shifted_inside(60, 100).box == (-10, 5, 70, 85)  # too wide: stays


def test_mask_utilities():
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 8:40] = 255
    assert np.array_equal(binarize(m > 0), m) and np.array_equal(binarize(m / 255.0), m)
    t = to_tensor_mask(m)
    assert t.shape == (1, 64, 64) and t.dtype == torch.float32 and set(t.unique().tolist()) == {0.0, 1.0}
    near = downsample_mask(m, 8)
    assert near.shape == (1, 8, 8) and set(near.unique().tolist()) <= {0.0, 1.0}
    assert near[0, 2:6, 1:5].min() == 1 and near[0, 0].max() == 0
    area = downsample_mask(torch.from_numpy(m / 255.0)[None, None], (4, 4), mode="area")
    assert area.shape == (1, 1, 4, 4) and 0 < area[0, 0, 1, 2] < 1
    stats = mask_stats(m)
    assert stats.bbox == (8, 16, 40, 48) and stats.area == pytest.approx(32 * 32 / 64 ** 2)
    assert mask_stats(np.zeros((4, 4), np.uint8)).bbox is None
    assert mask_stats(dilate(m, 3)).area > stats.area > mask_stats(erode(m, 3)).area
    base = Image.new("RGB", (64, 64), (10, 10, 10))
    shown = np.asarray(overlay(base, m, (0, 255, 0)))
    assert shown[30, 20, 1] > 50 and tuple(shown[2, 2]) == (10, 10, 10)
    outlined = np.asarray(overlay(base, m, (255, 0, 0), outline=True))
    assert outlined[16, 20, 0] == 255 and tuple(outlined[30, 20]) == (10, 10, 10)


def test_load_mask_alpha_or_brightness(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[:3, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert load_mask(tmp_path / "alpha.png")[:3].min() == 255 and load_mask(tmp_path / "alpha.png")[3:].max() == 0
    grey = np.zeros((6, 6), np.uint8)
    grey[:, :2] = 200
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(load_mask(tmp_path / "grey.png"), binarize(grey))


def test_demo_sets_are_deterministic_photo_folders(tmp_path):
    src, ref = make_demo_sets(tmp_path / "a")
    src2, ref2 = make_demo_sets(tmp_path / "b")
    for one, two in [(src, src2), (ref, ref2)]:
        files = list_images(one)
        assert len(files) == 4
        assert [f.read_bytes() for f in files] == [f.read_bytes() for f in list_images(two)]
        assert all(min(load_image(f).size) >= 256 for f in files)


def test_companion_pictures_are_not_generated_images(tmp_path):
    from magicstudio.data.images import list_generated

    names = ["000-seed0.png", "000-seed0-attention.png", "001-seed1-2.png", "001-seed1-2-attention.png",
             "000-seed0-post.png", "002-seed2-masks.png", "references.png", "references-2.png", "preview.png",
             "my-preview.png", "masks.png"]
    for n in names:
        Image.new("RGB", (4, 4)).save(tmp_path / n)
    assert [p.name for p in list_generated(tmp_path)] == ["000-seed0.png", "001-seed1-2.png", "masks.png",
                                                          "my-preview.png"]
