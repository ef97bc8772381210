"""Bad input gets a one-line reason, never a traceback; valid work continues; nothing a user made is lost."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magicstudio.cli.main import main
from magicstudio.data import images
from magicstudio.data.images import load_image
from magicstudio.data.prepare import load_prepared, prepare_folder
from magicstudio.data.samples import sample_photos
from magicstudio.errors import UserError
from magicstudio.io import load_tensors
from magicstudio.models.base import load_base
from magicstudio.models.face_encoder import load_face_encoder


@pytest.fixture
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for p in sample_photos():  # astronaut.jpg, grace_hopper.jpg
        shutil.copy(p, d / p.name)
    return d


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (rc, err)
    return lines[0]


# 1. an --out folder holding the user's own files is refused, nothing written; prepare's own folder stays re-runnable


@pytest.mark.parametrize("theirs", ["images/astronaut.png", "manifest.json", "preview.png"])
def test_prepare_refuses_out_folder_with_files_it_did_not_write(photos, tmp_path, capsys, theirs):
    out = tmp_path / "out"
    (out / theirs).parent.mkdir(parents=True, exist_ok=True)
    (out / theirs).write_bytes(b"the user's own file")
    before, listing = _snapshot(out), sorted(out.rglob("*"))
    line = _one_line_error(["prepare", str(photos), "--role", "source", "--out", str(out)], capsys)
    assert theirs in line and "did not write" in line
    assert _snapshot(out) == before and sorted(out.rglob("*")) == listing  # untouched, nothing written


@pytest.fixture(scope="module")
def analyzer():
    from magicstudio.data.faces import MediapipeFaceAnalyzer

    with MediapipeFaceAnalyzer() as fa:
        yield fa


def test_prepare_never_overwrites_or_deletes_user_files_inside_its_folder(photos, tmp_path, analyzer):
    out = tmp_path / "out"
    (photos / "grace_hopper.jpg").rename(tmp_path / "grace_hopper.jpg")
    prepare_folder(photos, "source", out, size=128, analyzer=analyzer, progress=False)
    first = _snapshot(out)
    prepare_folder(photos, "source", out, size=128, analyzer=analyzer, progress=False)
    assert _snapshot(out) == first  # re-running on its own output is idempotent

    (out / "images" / "grace_hopper.png").write_bytes(b"mine")  # the user's file where a new photo's crop would go
    (out / "masks" / "face" / "extra.png").write_bytes(b"also mine")
    shutil.copy(tmp_path / "grace_hopper.jpg", photos / "grace_hopper.jpg")
    with pytest.raises(UserError, match="images/grace_hopper.png.*did not write"):
        prepare_folder(photos, "source", out, size=128, analyzer=analyzer, progress=False)
    assert (out / "images" / "grace_hopper.png").read_bytes() == b"mine" and len(load_prepared(out)) == 1

    (out / "images" / "grace_hopper.png").unlink()
    (photos / "astronaut.jpg").unlink()  # its outputs are stale now: removed, but the user's extra file stays
    report = prepare_folder(photos, "source", out, size=128, analyzer=analyzer, progress=False)
    assert [i.stem for i in report.items] == ["grace_hopper"] and not (out / "images" / "astronaut.png").exists()
    assert (out / "masks" / "face" / "extra.png").read_bytes() == b"also mine"


def test_interrupted_prepare_can_be_run_again(photos, tmp_path, analyzer):
    class Interrupting:
        def detect(self, img):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_folder(photos, "source", out, size=128, analyzer=Interrupting(), progress=False)
    with pytest.raises(UserError, match="did not finish"):
        load_prepared(out)
    (out / "images" / "astronaut.png").write_bytes(b"half-written by the interrupted run")
    report = prepare_folder(photos, "source", out, size=128, analyzer=analyzer, progress=False)
    assert len(report.items) == 2 and len(load_prepared(out)) == 2
    assert "writing" not in json.loads((out / "manifest.json").read_text())


# 2. an output folder that cannot be written


def test_prepare_unwritable_out_is_one_line(photos, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot write to"):
        prepare_folder(photos, "source", tmp_path / "a_file" / "out", progress=False)
    sysfs = [Path("/sys/kernel/magicprep")] if Path("/sys/kernel").is_dir() else []  # not writable, even by root
    for out in [tmp_path / "a_file" / "out", *sysfs]:
        assert "cannot write to" in _one_line_error(["prepare", str(photos), "--role", "source", "--out", str(out)],
                                                    capsys)


# 3. real camera sizes open; absurd sizes are refused with the pixel count and the limit


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` but holds almost no pixel data (no big file, no big decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


@pytest.mark.parametrize("width, height", [(11648, 8736), (16320, 12240)])  # 100 MP camera, 200 MP phone
def test_camera_sized_photos_are_not_decompression_bombs(tmp_path, width, height):
    with pytest.raises(UserError) as err:  # header only: it gets as far as decoding, which finds it truncated
        load_image(_png_header(tmp_path / "big.png", width, height))
    assert "truncated" in str(err.value) and "bomb" not in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's global is left as it was


def test_absurd_sizes_are_refused_naming_pixels_and_limit(tmp_path, monkeypatch):
    with pytest.raises(UserError) as err:
        load_image(_png_header(tmp_path / "huge.png", 30000, 20000))
    assert "600,000,000 pixels" in str(err.value) and "300,000,000" in str(err.value) and "bomb" in str(err.value)
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(UserError, match=r"1,600 pixels, over the limit of 1,000"):
        load_image(tmp_path / "small.png")


# 4. a damaged weights file is not called unsafe; an unsafe one still is


def test_damaged_pth_is_not_readable_rather_than_unsafe(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "real.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "real.pth").read_bytes()[:1000])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ["cut.pth", "random.pth", "empty.pth"]:
        with pytest.raises(UserError) as err:
            load_face_encoder(str(tmp_path / name))
        assert "not a readable PyTorch checkpoint" in str(err.value) and "run code" not in str(err.value)
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refusing.*run code"):
        load_tensors(tmp_path / "evil.pth")


# 5. a folder where a file is expected, a file where a folder is expected


def test_folder_given_as_weights_and_file_given_as_masks(photos, tmp_path, capsys):
    with pytest.raises(UserError, match="is a folder, not a weights file"):
        load_face_encoder(str(tmp_path))
    mask_file = photos / "astronaut.jpg"
    with pytest.raises(UserError, match="is a file, not a mask folder"):
        prepare_folder(photos, "source", tmp_path / "out", masks_dir=mask_file, progress=False)
    line = _one_line_error(["prepare", str(photos), "--role", "source", "--out", str(tmp_path / "out"),
                            "--masks", str(mask_file)], capsys)
    assert "is a file, not a mask folder" in line


# 6. --model: only options that exist, and plainly "not readable" for garbage


def test_model_file_messages_name_what_exists(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "wrongkeys.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "x"}, tmp_path / "embedding.pt")
    for name in ["wrongkeys.safetensors", "embedding.pt"]:
        with pytest.raises(UserError) as err:
            load_base(str(tmp_path / name))
        assert "LoRA or an embedding" in str(err.value) and "--lora" not in str(err.value)
    (tmp_path / "garbage.ckpt").write_bytes(np.random.default_rng(1).bytes(3000))
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(9)}}, tmp_path / "real.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "real.ckpt").read_bytes()[:500])
    for name in ["garbage.ckpt", "cut.ckpt"]:
        with pytest.raises(UserError) as err:
            load_base(str(tmp_path / name))
        assert "not a readable" in str(err.value) and "--base-config" not in str(err.value)
    torch.save({"state_dict": {"model.diffusion_model.x": argparse.Namespace()}}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refusing"):
        load_base(str(tmp_path / "evil.ckpt"))
