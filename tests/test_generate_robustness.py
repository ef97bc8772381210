"""`capture generate` on bad input: one line (`error: ...`, exit 2), nothing generated before the check, nothing
overwritten. One tiny MagiCapture run per module; each test damages its own copy."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from magicstudio.cli.main import main
from magicstudio.errors import UserError
from magicstudio.methods.magicapture import make_config, run_training
from magicstudio.training.generate import generate

FAST = dict(ti_steps=2, lora_steps=2, checkpoint_every=2, resolution=64, sample_steps=2, face_encoder="tiny")
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def trained(demo_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    run_training(demo_sets[0], demo_sets[1], out, make_config("smoke", **FAST), progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run that the test may damage."""
    return shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "samples", "logs"))


def _generate(capsys, run, *extra) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["capture", "generate", str(run), "--steps", "2", "--num-images", "1", *map(str, extra)])
    return rc, capsys.readouterr().err


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _pngs(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []


@pytest.mark.parametrize("damage", ["empty", "junk", "wrong keys"])
def test_damaged_lora_file_is_named(run, capsys, damage):
    path = run / LORA
    if damage == "wrong keys":
        save_file({"foo.bar": torch.zeros(2, 2)}, str(path))
    else:
        path.write_bytes(b"" if damage == "empty" else b"junk\n")
    line = _one_line_error(*_generate(capsys, run))
    assert str(path) in line and "the file is damaged" in line
    assert not (run / "generated").exists()


def test_lora_for_another_model_is_one_line(run, capsys):
    state = load_file(str(run / LORA))
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state.items()}, str(run / LORA))
    line = _one_line_error(*_generate(capsys, run))
    assert str(run / LORA) in line and "cannot be loaded" in line


def test_damaged_embedding_file_is_named(run, capsys):
    path = run / "embeddings" / "v2.safetensors"
    path.write_text("junk\n")
    line = _one_line_error(*_generate(capsys, run))
    assert str(path) in line and "the file is damaged" in line


@pytest.mark.parametrize("where", ["file", "under a file", "/proc/x"])
def test_unusable_out_folder(run, tmp_path, capsys, where):
    (tmp_path / "file").write_text("mine")
    out = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "sub", "/proc/x": "/proc/x"}[where]
    if where == "/proc/x" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    line = _one_line_error(*_generate(capsys, run, "--out", out))
    assert str(out) in line and ("is a file" in line or "cannot create" in line)
    with pytest.raises(UserError):
        generate(run, out, num_images=1, steps=2)
    assert (tmp_path / "file").read_text() == "mine"


def test_generating_again_never_overwrites(run, tmp_path, capsys):
    out = tmp_path / "out"
    post = ["--save-attention", "--upscale", "2", "--sr", "lanczos"]
    assert _generate(capsys, run, "--out", out, *post)[0] == 0
    first = {name: (out / name).read_bytes() for name in _pngs(out)}
    assert sorted(first) == ["000-seed0-attention.png", "000-seed0-post.png", "000-seed0.png"]
    assert _generate(capsys, run, "--out", out, "--guidance", "3", *post)[0] == 0  # a different image, same name
    assert _pngs(out) == sorted([*first, "000-seed0-2-attention.png", "000-seed0-2-post.png", "000-seed0-2.png"])
    assert all((out / name).read_bytes() == data for name, data in first.items())
    second = Image.open(out / "000-seed0-2.png")
    assert "Seed: 0" in second.info["parameters"] and "CFG scale: 3.0" in second.info["parameters"]
    assert "Postprocess: upscale x2 (lanczos)" in Image.open(out / "000-seed0-2-post.png").info["parameters"]


def test_missing_lora_of_a_lora_run(run, capsys):
    (run / LORA).unlink()
    line = _one_line_error(*_generate(capsys, run))
    assert line.startswith(f"error: missing {run / LORA} ")
    assert not (run / "generated").exists()


def test_run_without_lora_steps_needs_no_lora(run, tmp_path):
    (run / LORA).unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "lora_steps": 0}))
    assert [p.name for p in generate(run, tmp_path / "out", num_images=1, steps=2)] == ["000-seed0.png"]


def test_missing_embedding_file_is_named(run, capsys):
    (run / "embeddings" / "v1.safetensors").unlink()
    line = _one_line_error(*_generate(capsys, run))
    assert line.startswith(f"error: missing {run / 'embeddings' / 'v1.safetensors'} ")


@pytest.mark.parametrize("args", [
    ["--upscale", "2", "--sr", "bicubic"],
    ["--sr", "bicubic"],
    ["--restore-weights", "MISSING"],
    ["--restore-weights", "GARBAGE"],
    ["--restore-weights", "GARBAGE_ST"],
])
def test_postprocessing_is_checked_before_any_image(run, tmp_path, capsys, args):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\0" * 16)
    files = {"MISSING": tmp_path / "nope.pth", "GARBAGE": tmp_path / "garbage.pth",
             "GARBAGE_ST": tmp_path / "garbage.safetensors"}
    args = [str(files.get(a, a)) for a in args]
    _one_line_error(*_generate(capsys, run, "--out", tmp_path / "out", *args))
    assert _pngs(tmp_path / "out") == []


@pytest.mark.parametrize("seed, n", [("99999999999999999999", 1), (str(2**64 - 1), 2), (str(-(2**63) - 1), 1)])
def test_seed_out_of_range(run, capsys, seed, n):
    line = _one_line_error(*_generate(capsys, run, "--seed", seed, "-n", n))
    assert "--seed" in line
    assert not (run / "generated").exists()


def test_negative_and_largest_seeds_still_work(run, tmp_path):
    paths = generate(run, tmp_path / "out", num_images=1, steps=2, seed=-1)
    paths += generate(run, tmp_path / "out", num_images=1, steps=2, seed=2**64 - 1)
    assert [p.name for p in paths] == ["000-seed-1.png", f"000-seed{2**64 - 1}.png"]


def test_heatmaps_are_not_images(run, tmp_path, capsys, demo_sets):
    """The README's flow: `generate --save-attention`, then `evaluate` and `postprocess` on the folder. The
    `*-attention.png` heatmaps (and `-post` copies) beside the images are companions, not samples: n counts the
    generated images only, and postprocess writes one output per generated image."""
    out = tmp_path / "gen"
    rc = main(["capture", "generate", str(run), "--steps", "2", "--num-images", "3", "--save-attention", "-o", str(out)])
    assert rc == 0
    assert len(list(out.glob("*-attention.png"))) == 3 and len(_pngs(out)) == 6
    capsys.readouterr()
    rc = main(["evaluate", "-g", str(out), "-r", str(demo_sets[1]), "-m", "style,clip_t", "--clip-model", "tiny",
               "-o", str(tmp_path / "report.json")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "(n=3," in text and "(n=6," not in text, text
    rc = main(["postprocess", str(out), "-o", str(tmp_path / "post"), "--sr", "lanczos", "-q"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "post").glob("*.png")) == [f"{i:03d}-seed{i}.png" for i in range(3)]


def test_library_notices_silenced_unless_verbose(run, tmp_path):
    """transformers' torchvision fallback and `mean_resizing` notices are silenced at start-up; `-v` shows them."""
    import subprocess
    import sys

    def stderr(*pre):
        cmd = [sys.executable, "-m", "magicstudio", *pre, "capture", "generate", str(run), "--steps", "1", "-n", "1",
               "-o", str(tmp_path / f"out{len(pre)}")]
        env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}  # conftest quiets them
        env["OMP_NUM_THREADS"] = "1"
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        return res.stderr

    quiet = stderr()
    assert "mean_resizing" not in quiet and "[transformers]" not in quiet, quiet
    assert "mean_resizing" in stderr("-v")
