"""Outputs that drop in: a refused start leaves no run folder, files honour the umask (0644 under 022), and
postprocess picks the best upscaler installed, saying which."""

from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

from magicstudio.cli.main import main


def _train_args(demo_sets, out, *extra):
    return ["capture", "train", "--source", str(demo_sets[0]), "--reference", str(demo_sets[1]), "-o", str(out),
            "--model", "tiny", "--preset", "smoke", "--ti-steps", "1", "--lora-steps", "1", "--resolution", "64",
            "--set", "sample_steps=1", "--set", "face_encoder=tiny", "-q", *extra]


@pytest.mark.parametrize("bad", [["--lora-rank", "0"], ["--sample-every", "-1"], ["--set", "keep_checkpoints=0"],
                                 ["--set", "face_encoder=/nowhere/backbone.safetensors"]])
def test_a_refused_start_leaves_no_folder(demo_sets, tmp_path, capsys, bad):
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_train_args(demo_sets, out, *bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not out.exists()


def test_a_start_refused_after_config_yaml_leaves_no_folder(demo_sets, tmp_path, capsys, monkeypatch):
    """The method fails while being built (config.yaml already written): still no folder (nothing trained)."""
    from magicstudio.errors import UserError
    from magicstudio.methods.magicapture import train as T

    def refuse(self, *a, **k):
        raise UserError("refused on purpose")

    monkeypatch.setattr(T.MagiCapture, "__init__", refuse)
    out = tmp_path / "run"
    assert main(_train_args(demo_sets, out)) == 2
    assert "refused on purpose" in capsys.readouterr().err
    assert not out.exists()


def test_run_outputs_honour_the_umask(demo_sets, tmp_path):
    """Every file a run and its generation write: 0666 & ~umask (0644 under 022, 0640 under 027), so a
    ComfyUI/A1111 service of the same group can read the LoRA, the embeddings and the A1111 files."""
    for mask in (0o022, 0o027):
        old = os.umask(mask)
        try:
            out = tmp_path / f"run{mask:o}"
            assert main(_train_args(demo_sets, out)) == 0
            assert main(["capture", "generate", str(out), "--steps", "1", "-n", "1", "--save-attention"]) == 0
        finally:
            os.umask(old)
        files = [p for p in out.rglob("*") if p.is_file()]
        assert any(p.name == "pytorch_lora_weights.safetensors" for p in files) and len(files) > 10
        modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
        assert set(modes.values()) == {0o666 & ~mask}, modes


def test_postprocess_picks_the_best_upscaler_installed(tmp_path, capsys, monkeypatch):
    import importlib

    U = importlib.import_module("magicstudio.postprocess.upscale")

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    monkeypatch.setattr(U, "realesrgan_status", lambda: (False, "not installed"))
    capsys.readouterr()
    assert main(["postprocess", str(tmp_path / "a.png"), "-o", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "super-resolution: Lanczos" in text and "Lanczos x2" in text.replace("lanczos", "Lanczos"), text
    assert Image.open(tmp_path / "out" / "a.png").size == (32, 32)
    monkeypatch.setattr(U, "realesrgan_status", lambda: (True, ""))
    assert U.best_sr_backend("auto")[0] == "realesrgan"
    assert U.best_sr_backend("lanczos") == ("lanczos", "")
