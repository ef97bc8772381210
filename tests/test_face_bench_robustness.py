"""Bad input to ``face`` and ``bench``: one ``error:`` line and exit 2, nothing a user made is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from magicstudio.cli.main import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    d = tmp_path_factory.mktemp("face")
    img, mask = d / "cat.png", d / "mask.png"
    Image.new("RGB", (64, 64), (120, 80, 40)).save(img)
    Image.new("L", (64, 64), 255).save(mask)
    return img, mask


def _face(photo, out, *extra):
    img, mask = photo
    return ["face", "-c", f"cat={img}:{mask}", "-p", "a photo of a cat", "-o", str(out), "--steps", "2",
            "--size", "64", "--model", "tiny", "-q", *extra]


def _one_error(capsys, rc, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_face_twice_keeps_earlier_images(photo, tmp_path):
    out = tmp_path / "out"
    assert main(_face(photo, out, "--save-masks")) == 0
    first = {p: p.read_bytes() for p in out.rglob("*.png")}
    assert (out / "000-seed0.png").is_file() and (out / "references.png").is_file()
    assert main(_face(photo, out, "--save-masks")) == 0
    for p, data in first.items():
        assert p.read_bytes() == data, p
    assert (out / "000-seed0-2.png").is_file() and (out / "000-seed0-2-masks.png").is_file()
    assert (out / "masks" / "000-seed0-2").is_dir() and (out / "references-2.png").is_file()


@pytest.mark.parametrize("extra, words", [
    (["--seed", "99999999999999999999999"], ["--seed"]),
    (["--seed", str(2**64 - 1), "-n", "2"], ["--seed"]),
    (["--seed", str(-2**63 - 1)], ["--seed"]),
    (["--guidance", "nan"], ["--guidance", "nan"]),
    (["--guidance", "inf"], ["--guidance"]),
    (["--alpha", "nan"], ["--alpha", "nan"]),
    (["--alpha", "2"], ["--alpha", "2"]),
    (["--weight", "nan"], ["--weight", "nan"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--layers", "(["], ["(["]),
    (["--layers", "up:abc"], ["up:abc"]),
    (["--layers", "up:9"], ["up:9", "selects no attention layer"]),
    (["--layers", "res:9"], ["res:9", "selects no attention layer"]),
    (["--layers", "res:x"], ["res:x"]),
    (["--layers", "nothing\\.matches"], ["selects no attention layer"]),
])
def test_face_bad_options(photo, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    _one_error(capsys, main(_face(photo, out, *extra)), *words)
    assert not out.exists() or not any(out.iterdir())


def test_face_options_checked_before_model_load(photo, tmp_path, capsys, monkeypatch):
    import magicstudio.models.base as base

    monkeypatch.setattr(base, "load_base", lambda *a, **k: pytest.fail("model loaded before the checks"))
    _one_error(capsys, main(_face(photo, tmp_path / "o", "--guidance", "nan")), "--guidance")


def test_select_layers_errors():
    from magicstudio.attention.capture import select_layers
    from magicstudio.errors import UserError
    from magicstudio.models.base import load_base

    unet = load_base("tiny").unet
    for spec in ("([", "res:abc", "res:9", "res:"):
        with pytest.raises(UserError):
            select_layers(unet, spec)
    assert select_layers(unet, "res:4")


# bench ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def pairs_file(tmp_path):
    src, ref = tmp_path / "src", tmp_path / "ref"
    src.mkdir()
    ref.mkdir()
    f = tmp_path / "pairs.yaml"
    f.write_text(f"- name: p1\n  source: {src}\n  reference: {ref}\n")
    return f


@pytest.fixture
def no_training(monkeypatch):
    import magicstudio.experiments.bench as bench

    def boom(*a, **k):
        raise AssertionError("training / preparation started before the checks")

    monkeypatch.setattr(bench, "run_cell", boom)
    monkeypatch.setattr(bench, "_prepare_pair", boom)


def _bench(pairs, out, *extra):
    return ["bench", "--pairs", str(pairs), "-o", str(out), "--methods", "textual-inversion", "--preset", "smoke",
            "-n", "1", "--steps", "2", "-q", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--metrics", "bogus"], ["bogus"]),
    (["--metrics", ""], ["metric"]),
    (["--face-backend", "bogus"], ["bogus"]),
    (["--set", "textual-inversion.steps=abc"], ["steps", "abc"]),
    (["--set", "steps=abc"], ["steps"]),
    (["--set", "textual-inversion.steps=-3"], ["steps", "-3"]),
    (["--set", "lr=nan"], ["lr", "nan"]),
    (["--set", "textual-inversion.hflip=3"], ["hflip"]),
])
def test_bench_settings_checked_up_front(pairs_file, tmp_path, capsys, no_training, extra, words):
    out = tmp_path / "sweep"
    _one_error(capsys, main(_bench(pairs_file, out, *extra)), *words)
    assert not out.exists()


def test_bench_good_settings_pass_check():
    from magicstudio.experiments.bench import BenchSettings, check_settings, parse_set

    check_settings(BenchSettings(methods=["textual-inversion", "magicapture"], preset="smoke",
                                 overrides=parse_set(["textual-inversion.steps=10", "lr=1e-4", "textual-inversion.grad_clip=null",
                                                      "magicapture.use_ar=false", "seed=-1"])))


def test_bench_binary_pairs_file(tmp_path, capsys, no_training):
    f = tmp_path / "pairs.yaml"
    f.write_bytes(b"\xff\xfe\x00\x81\x90binary\x00\xff")
    _one_error(capsys, main(_bench(f, tmp_path / "sweep")), str(f))


def test_bench_damaged_cell_json(pairs_file, tmp_path, capsys, no_training):
    out = tmp_path / "sweep"
    cell = out / "cells" / "p1" / "textual-inversion"
    cell.mkdir(parents=True)
    (out / "bench.yaml").write_text("pairs: []\n")
    (cell / "cell.json").write_text('{"fingerprint": {')
    line = _one_error(capsys, main(_bench(pairs_file, out)), "cell.json", "delete")
    assert str(cell) in line


def test_bench_refuses_foreign_out_folder(pairs_file, tmp_path, capsys, no_training):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    _one_error(capsys, main(_bench(pairs_file, out)), str(out))
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert (out / "report.md").read_text() == "my notes\n"
