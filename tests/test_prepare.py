"""``prepare_folder`` and ``magicstudio prepare`` on real photos mixed with the files users really bring."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magicstudio.cli import main as cli_main
from magicstudio.data.faces import MediapipeFaceAnalyzer
from magicstudio.data.images import Crop
from magicstudio.data.masks import load_mask
from magicstudio.data.prepare import is_prepared, load_prepared, prepare_folder, unique_stems
from magicstudio.data.samples import sample_photos
from magicstudio.errors import UserError

SIZE = 256


@pytest.fixture(scope="module")
def analyzer():
    with MediapipeFaceAnalyzer() as fa:
        yield fa


@pytest.fixture
def photos(tmp_path) -> Path:
    """Two portraits, a truncated JPEG, a text file named .jpg, a faceless image, and files to ignore."""
    d = tmp_path / "photos"
    d.mkdir()
    for p in sample_photos():
        shutil.copy(p, d / p.name)
    data = sample_photos()[0].read_bytes()
    (d / "broken.jpg").write_bytes(data[: len(data) // 3])
    (d / "notes.jpg").write_text("this is not a photo\n")
    ramp = np.linspace(0, 255, 320, dtype=np.uint8)
    Image.fromarray(np.dstack([np.tile(ramp, (240, 1))] * 3)).save(d / "landscape.png")
    (d / ".DS_Store").write_bytes(b"\0\1")
    (d / "readme.txt").write_text("ignored")
    return d


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _reasons(report) -> dict[str, str]:
    return {Path(r.path).name: r.reason for r in report.rejected}


def test_source_crops_faces_rejects_bad_files(photos, tmp_path, analyzer):
    before = _hashes(photos)
    out = tmp_path / "out"
    report = prepare_folder(photos, "source", out, size=SIZE, analyzer=analyzer, progress=False)
    assert _hashes(photos) == before  # inputs untouched
    assert [i.stem for i in report.items] == ["astronaut", "grace_hopper"]
    reasons = _reasons(report)
    assert set(reasons) == {"broken.jpg", "notes.jpg", "landscape.png", ".DS_Store", "readme.txt"}  # every file
    assert "truncated" in reasons["broken.jpg"] and "not an image" in reasons["notes.jpg"]
    assert "no face" in reasons["landscape.png"]
    assert any("4-6" in w for w in report.warnings)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["role"] == "source" and manifest["size"] == SIZE and manifest["version"] == 1
    assert {Path(r["path"]).name for r in manifest["rejected"]} == set(reasons)
    for item, entry in zip(report.items, manifest["items"]):
        img = Image.open(out / entry["image"])
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        masks = {k: load_mask(out / v) for k, v in entry["masks"].items()}
        assert set(masks) == {"face", "head", "person"}
        assert all(m.shape == (SIZE, SIZE) for m in masks.values())
        lm = np.array(entry["landmarks5"])
        assert lm.shape == (5, 2) and lm[0, 0] < lm[1, 0]
        xy = np.round(lm).astype(int)
        assert (masks["face"][xy[:, 1], xy[:, 0]] > 0).all()  # landmarks in crop pixels, inside the face
        x0, y0, x1, y1 = entry["face_box"]
        assert 0.3 < (x1 - x0) / SIZE < 0.6 and abs((x0 + x1) / 2 - SIZE / 2) < SIZE * 0.1  # selfie framing
        assert 0.08 < entry["mask_stats"]["face"]["area"] < 0.45
        assert entry["mask_stats"]["head"]["area"] > entry["mask_stats"]["face"]["area"]
        assert entry["n_faces"] == 1 and entry["chosen"] == 0 and entry["original_size"] == list(Image.open(entry["source"]).size)
        assert np.allclose(item.landmarks5, lm, atol=0.006)  # the manifest rounds to 0.01 px
    preview = Image.open(out / "preview.png")
    assert preview.width <= 4 * 256 and 256 <= preview.height <= 400

    loaded = load_prepared(out)
    assert is_prepared(out) and loaded.role == "source" and len(loaded) == 2
    assert loaded[0].load_mask("face").shape == (SIZE, SIZE) and loaded[0].face_box.shape == (4,)


def test_reference_keeps_composition_and_faceless_photos(photos, tmp_path, analyzer):
    out = tmp_path / "ref"
    report = prepare_folder(photos, "reference", out, size=SIZE, analyzer=analyzer, progress=False)
    kept = {i.stem: i for i in report.items}
    assert set(kept) == {"astronaut", "grace_hopper", "landscape"} and len(report.rejected) == 4
    faceless = kept["landscape"]
    assert faceless.face_box is None and faceless.landmarks5 is None and faceless.n_faces == 0
    assert any("no face" in w for w in faceless.warnings)
    assert load_mask(faceless.masks["face"]).max() == 0
    assert faceless.crop_box == (40, 0, 280, 240)  # centre crop of 320x240
    astro = kept["astronaut"]  # 512x512: the whole photo, face where it was, scaled by 1/2
    assert astro.crop_box == (0, 0, 512, 512)
    assert 0.01 < astro.mask_stats["face"]["area"] < 0.08 and 70 < astro.landmarks5[:, 0].mean() < 150
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"][2]["landmarks5"] is None


def test_every_entry_of_the_folder_gets_a_manifest_line(photos, tmp_path, analyzer):
    """Issue 18: nothing in the input folder is skipped without a word, dangling symlinks included."""
    (photos / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (photos / "album").mkdir()
    out = tmp_path / "out"
    report = prepare_folder(photos, "reference", out, size=SIZE, analyzer=analyzer, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    kept = {Path(i["source"]).name for i in manifest["items"]}
    lines = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert kept | set(lines) == {p.name for p in photos.iterdir()} and not kept & set(lines)
    assert "dangling symbolic link" in lines["gone.jpg"] and "deleted.jpg" in lines["gone.jpg"]
    assert "folder" in lines["album"] and "hidden" in lines[".DS_Store"] and "not a photo" in lines["readme.txt"]
    assert _reasons(report) == lines


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(photos, tmp_path, analyzer):
    """Issue 18: a kill -9 during a write leaves ``.ms-<hex>.tmp`` files; the next prepare into the folder removes
    them (and only them)."""
    out = tmp_path / "out"
    prepare_folder(photos, "reference", out, size=SIZE, analyzer=analyzer, progress=False)
    stale = [out / ".ms-0123abcd.tmp", out / "images" / ".ms-deadbeef.tmp", out / "masks" / "face" / ".ms-00000000.tmp"]
    for p in stale:
        p.write_bytes(b"half a png")
    kept = out / "images" / ".ms-notours.tmp"
    kept.write_text("not a name prepare makes")
    prepare_folder(photos, "reference", out, size=SIZE, analyzer=analyzer, progress=False)
    assert not any(p.exists() for p in stale) and kept.exists()


def test_duplicate_photos_are_warned(photos, tmp_path, analyzer):
    """Issue 18: the same photo twice (a copy, and the same pixels saved as PNG) is kept but warned about."""
    shutil.copy(photos / "astronaut.jpg", photos / "astronaut copy.jpg")
    src = photos / "grace_hopper.jpg"
    Image.open(src).save(photos / "hopper-again.png")
    report = prepare_folder(photos, "reference", tmp_path / "out", size=SIZE, analyzer=analyzer, progress=False)
    dup = [w for w in report.warnings if "same photo" in w]
    assert len(dup) == 2, report.warnings
    assert any("astronaut copy.jpg" in w and "astronaut.jpg" in w for w in dup)
    assert any("hopper-again.png" in w and src.name in w for w in dup)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(dup) <= set(manifest["warnings"])


def test_object_source_gets_a_foreground_mask_instead_of_a_face(photos, tmp_path, analyzer):
    """Issue 13: ``--role source --subject object`` keeps a photo without a face, its "face" mask (what object mode
    trains inside, Eq. 4) being the user's mask; as a person it is rejected for having no face."""
    d = tmp_path / "objects"
    d.mkdir()
    shutil.copy(photos / "landscape.png", d / "landscape.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    fg = np.zeros((240, 320), np.uint8)
    fg[60:200, 100:220] = 255
    Image.fromarray(fg).save(masks / "landscape.png")
    person = prepare_folder(d, "source", tmp_path / "person", size=SIZE, analyzer=analyzer, progress=False)
    assert not person.items and "no face" in person.rejected[0].reason
    no_mask = prepare_folder(d, "source", tmp_path / "seg", size=SIZE, analyzer=analyzer, progress=False,
                             subject="object")  # a grey ramp: the person segmentation finds no foreground
    assert not no_mask.items and "no foreground" in no_mask.rejected[0].reason
    report = prepare_folder(d, "source", tmp_path / "object", size=SIZE, masks_dir=masks, analyzer=analyzer,
                            progress=False, subject="object")
    (item,) = report.items
    crop = item.crop_box  # centre crop 40..280 of 320x240, scaled by 256/240
    expect = np.asarray(Image.fromarray(fg).crop(crop).resize((SIZE, SIZE), Image.NEAREST)) > 0
    got = load_mask(item.masks["face"]) > 0
    assert got.mean() > 0.2 and (got == expect).mean() > 0.99
    assert item.face_box is None and item.landmarks5 is None
    code = cli_main.main(["prepare", str(d), "--role", "source", "--subject", "object", "--masks", str(masks),
                          "--out", str(tmp_path / "cli"), "--size", str(SIZE), "--quiet"])
    assert code == 0 and len(load_prepared(tmp_path / "cli")) == 1
    with pytest.raises(UserError, match="subject"):
        prepare_folder(d, "source", tmp_path / "x", size=SIZE, analyzer=analyzer, progress=False, subject="cat")


def test_several_faces_and_exif_rotation(tmp_path, analyzer):
    small, large = (Image.open(p).convert("RGB") for p in sample_photos())
    d = tmp_path / "in"
    d.mkdir()
    both = Image.new("RGB", (1024, 600), "white")
    both.paste(small, (0, 44))
    both.paste(large, (512, 0))
    both.save(d / "group.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: must be turned 90 degrees counter-clockwise to view
    small.transpose(Image.Transpose.ROTATE_270).save(d / "sideways.jpg", exif=exif.tobytes(), quality=95)
    small.crop((0, 60, 512, 512)).save(d / "top.jpg", quality=95)  # hair at the very top of the photo
    report = prepare_folder(d, "source", tmp_path / "out", size=SIZE, analyzer=analyzer, progress=False)
    group, sideways, top = report.items
    assert top.crop_box[1] == 0 and top.crop_box[3] <= 452  # moved down into the photo, not padded
    assert not any("padding" in w for w in top.warnings)
    assert group.n_faces == 2 and group.chosen == 1 and any("2 faces" in w for w in group.warnings)
    assert group.crop_box[0] > 512  # cropped around Grace Hopper, the larger face
    assert sideways.original_size == (512, 512) and sideways.landmarks5 is not None
    assert sideways.landmarks5[0, 1] < sideways.landmarks5[3, 1]  # upright: eyes above the mouth


def test_user_masks_override_and_bad_masks_reject_that_photo(photos, tmp_path, analyzer):
    masks = tmp_path / "masks"
    (masks / "head").mkdir(parents=True)
    rect = np.zeros((512, 512), np.uint8)
    rect[60:190, 170:280] = 255  # around the astronaut's face, in the original photo's pixels
    Image.fromarray(rect).save(masks / "astronaut.png")
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(masks / "head" / "grace_hopper.png")
    report = prepare_folder(photos, "source", tmp_path / "out", size=SIZE, masks_dir=masks,
                            analyzer=analyzer, progress=False)
    assert [i.stem for i in report.items] == ["astronaut"]
    reasons = _reasons(report)
    assert "100x100" in reasons["grace_hopper.jpg"] and "512x600" in reasons["grace_hopper.jpg"]
    assert "no user mask" in reasons["landscape.png"]
    item = report.items[0]
    assert item.user_masks == ["face"]
    face = load_mask(item.masks["face"])
    expected = Crop(item.crop_box, (SIZE, SIZE)).apply_mask(rect)
    assert np.array_equal(face, expected) and face.any()
    ys, xs = np.nonzero(face)
    corners = Crop(item.crop_box, (SIZE, SIZE)).map_box([169.5, 59.5, 279.5, 189.5])
    assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], corners + 0.5, atol=2)
    assert load_mask(item.masks["head"]).sum() > face.sum() * 0.5  # other kinds stay automatic


def test_rerun_is_idempotent_and_cleans_only_its_own_stale_outputs(photos, tmp_path, analyzer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    prepare_folder(photos, "source", out, size=SIZE, analyzer=analyzer, progress=False)
    first = _hashes(out)
    prepare_folder(photos, "source", out, size=SIZE, analyzer=analyzer, progress=False)
    assert _hashes(out) == first
    assert not [p for p in out.rglob("*.tmp")]
    (photos / "grace_hopper.jpg").unlink()
    report = prepare_folder(photos, "source", out, size=SIZE, analyzer=analyzer, progress=False)
    assert [i.stem for i in report.items] == ["astronaut"]
    assert not list(out.rglob("grace_hopper.png")) and (out / "my_notes.txt").read_text() == "keep me"
    assert len(load_prepared(out)) == 1


def test_stems_are_unique_and_safe(tmp_path, analyzer):
    assert unique_stems([Path("a.jpg"), Path("A.png"), Path("a.webp"), Path("my photo (1).JPG")]) == [
        "a", "A_png", "a_webp", "my_photo_1"]
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(sample_photos()[1], d / "me.jpg")
    Image.open(sample_photos()[1]).save(d / "me.png")
    report = prepare_folder(d, "source", tmp_path / "out", size=SIZE, analyzer=analyzer, progress=False)
    assert sorted(i.stem for i in report.items) == ["me", "me_png"]
    assert (tmp_path / "out" / "images" / "me_png.png").is_file()


def test_folder_errors(tmp_path, photos):
    (tmp_path / "empty").mkdir()
    for bad, match in [(tmp_path / "empty", "no photos"), (tmp_path / "missing", "not found")]:
        with pytest.raises(UserError, match=match):
            prepare_folder(bad, "source", tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="must not be"):
        prepare_folder(photos, "source", photos, progress=False)
    with pytest.raises(UserError, match="role"):
        prepare_folder(photos, "style", tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="multiple of 8"):
        prepare_folder(photos, "source", tmp_path / "o", size=100, progress=False)
    assert not is_prepared(tmp_path / "empty")
    with pytest.raises(UserError, match="not a prepared folder"):
        load_prepared(tmp_path / "empty")


@pytest.fixture
def cli(monkeypatch):
    """``main`` with only the prepare command registered (other command modules are not under test here)."""
    import magicstudio.cli.prepare  # noqa: F401  (registers the command)

    monkeypatch.setattr(cli_main, "_register", lambda: None)
    if len(cli_main.app.registered_commands) < 2:  # typer runs a lone command without its name
        monkeypatch.setattr(cli_main.app, "registered_callback", None)
        cli_main.app.callback()(lambda: None)
    return cli_main.main


def test_cli_prepare(cli, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(["prepare", str(photos), "--role", "source", "--out", str(out), "--size", str(SIZE)])
    text = capsys.readouterr()
    assert code == 0 and "kept 2 source photo(s), rejected 5" in text.out  # every file has a line
    assert "notes.jpg: not an image" in text.out and "preview.png" in text.out
    assert is_prepared(out)

    (tmp_path / "empty").mkdir()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_text("nope")
    cases = [
        ["prepare", str(tmp_path / "empty"), "--role", "source", "--out", str(tmp_path / "o1")],
        ["prepare", str(tmp_path / "missing"), "--role", "source", "--out", str(tmp_path / "o2")],
        ["prepare", str(only_bad), "--role", "reference", "--out", str(tmp_path / "o3"), "--quiet"],
        ["prepare", str(photos), "--role", "selfie", "--out", str(tmp_path / "o4")],
        ["prepare", str(photos), "--role", "source", "--out", str(tmp_path / "o5"), "--size", "100"],
    ]
    for argv in cases:
        code = cli(argv)
        text = capsys.readouterr()
        assert code != 0, argv
        assert "Traceback" not in text.err + text.out
        lines = text.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), text.err
