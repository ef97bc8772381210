"""MagicTailor's run folder and command line on the tiny model: outputs, resume, NaN stop, masks from photo folders,
the official preset's learning rates through the loop, and bad input (one line each, valid work goes on)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from magicstudio.cli.main import main
from magicstudio.errors import UserError
from magicstudio.methods.magictailor import make_config
from magicstudio.methods.magictailor.train import MagicTailor
from magicstudio.training.loop import TrainingDiverged, train
from magicstudio.training.runs import RunDir
from tailor_world import training_sets, write_folders

FAST = dict(resolution=64, warmup_steps=3, dsbal_steps=3, sample_steps=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("tailor") / "world")


def _train(m, run, **kw):
    return train(m, run, checkpoint_every=m.cfg.checkpoint_every, progress=False, tensorboard=False, **kw)


def _method(tiny, **kw):
    cfg = make_config("smoke", **{**FAST, **kw})
    return MagicTailor(cfg, tiny, training_sets(cfg.resolution))


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    code = main(["tailor", "train", "--concept", f"person={world / 'concept'}", "--component",
                 f"hair={world / 'component'}", "--out", str(out), "--preset", "smoke", "--masks", str(world / "masks"),
                 "--resolution", "64", "--warmup-steps", "3", "--dsbal-steps", "3", "--quiet"])
    assert code == 0
    return out


def test_run_folder_contract(finished, world):
    from safetensors.torch import load_file

    run = RunDir(finished)
    assert run.is_done()
    cfg = run.read_config()
    assert cfg["tokens"] == ["<v0>", "<v1>"] and cfg["concept_class"] == "person" and cfg["component_classes"] == "hair"
    assert cfg["concept"] == str(world / "concept") and cfg["component_hair"] == str(world / "component")
    assert cfg["images"] == {"concept": ["concept0", "concept1", "concept2"], "component_hair": ["component0", "component1"]}
    for f in ("pytorch_lora_weights.safetensors", "embeddings/v0.safetensors", "embeddings/v1.safetensors",
              "masks-preview.png", "metrics.jsonl"):
        assert (finished / f).is_file(), f
    assert list((finished / "a1111").glob("*.safetensors")) and list(run.samples.glob("step-*.png"))
    assert load_file(str(finished / "embeddings" / "v0.safetensors"))["<v0>"].shape[-1] == 32
    records = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert [r["task"].split(":")[0] for r in records] == ["warmup"] * 3 + ["ds_bal"] * 3
    assert all("loss_pres" in r for r in records[3:]) and not any("loss_pres" in r for r in records[:3])
    assert [r["lr"] for r in records] == pytest.approx([1e-3] * 6)


def test_generate_from_the_run_and_a_prompt_without_a_token(finished, tmp_path, capsys):
    assert main(["tailor", "generate", str(finished), "--prompt", "<v0> with <v1>, on the beach", "-n", "1",
                 "--steps", "2", "--out", str(tmp_path / "g")]) == 0
    assert len(list((tmp_path / "g").glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["tailor", "generate", str(finished), "--prompt", "<v0> on the beach", "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert "<v1>" in err and len(err.strip().splitlines()) == 1


def test_resume_after_a_crash_gives_identical_weights(tiny, tmp_path, monkeypatch):
    base = copy.deepcopy(tiny)
    m1 = _method(tiny)
    _train(m1, RunDir(tmp_path / "a").create(), deterministic=True)
    real = MagicTailor.micro_step

    def crash(self, phase, step):
        if step == 5:  # a crash, not Ctrl-C (which checkpoints the last finished step): the periodic checkpoint
            raise RuntimeError("killed")
        return real(self, phase, step)

    monkeypatch.setattr(MagicTailor, "micro_step", crash)
    with pytest.raises(RuntimeError):
        _train(_method(copy.deepcopy(base)), RunDir(tmp_path / "b").create(), deterministic=True)
    monkeypatch.setattr(MagicTailor, "micro_step", real)
    assert RunDir(tmp_path / "b").latest_checkpoint()[0] == 4  # inside DS-Bal: the EMA must come back too
    m3 = _method(copy.deepcopy(base))
    _train(m3, RunDir(tmp_path / "b"), resume=True, deterministic=True)
    sa, sb = m1.trainable_state(), m3.trainable_state()
    assert sa.keys() == sb.keys() and any(k.startswith("ema.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    real = MagicTailor.micro_step

    def poison(self, phase, step):
        out = real(self, phase, step)
        if step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MagicTailor, "micro_step", poison)
    run = RunDir(tmp_path / "run").create()
    with pytest.raises(TrainingDiverged, match="step-000002"):
        _train(_method(tiny), run)
    assert run.latest_checkpoint()[0] == 2 and not run.is_done()


def test_official_preset_lrs_through_the_loop(tiny, tmp_path):
    m = _method(tiny, scale_lr=True, dsbal_lr_first_step_only=True, warmup_lr=1e-3, dsbal_lr=1e-4)
    _train(m, RunDir(tmp_path / "run").create())
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n = 5  # images: 3 concept + 2 component; the lr logged is the next step's (after the scheduler)
    assert lrs == pytest.approx([1e-3 * n, 1e-3 * n, 1e-4 * n, 1e-3 * n, 1e-3 * n, 1e-3 * n])


def test_masks_from_photo_folders_and_bad_images_left_out(world, tmp_path, capsys):
    """The concept mask is person AND NOT hair from the user masks; a component photo without its component
    and a wrong-size mask are left out with the reason; the run goes on with the others."""
    import shutil

    w = tmp_path / "w"
    shutil.copytree(world, w)
    blank = np.full((96, 96, 3), 128, np.uint8)
    Image.fromarray(blank).save(w / "component" / "nohair.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(w / "masks" / "hair" / "nohair.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(w / "masks" / "hair" / "component1.png")  # wrong size
    out = tmp_path / "run"
    code = main(["tailor", "train", "--concept", f"person={w / 'concept'}", "--component", f"hair={w / 'component'}",
                 "--out", str(out), "--preset", "smoke", "--masks", str(w / "masks"), "--resolution", "64",
                 "--warmup-steps", "1", "--dsbal-steps", "1", "--quiet"])
    assert code == 0
    cfg = RunDir(out).read_config()
    assert cfg["images"]["component_hair"] == ["component0"]
    left = " | ".join(cfg["left_out"])
    assert "nohair" in left and "not found" in left and "component1" in left and "40x40" in left
    # the training masks: person AND NOT hair for the concept
    from magicstudio.methods.magictailor.masks import build_training_sets
    from magicstudio.training.concepts import load_concept

    sets = {"concept": load_concept(out / "prepared" / "concept", 64),
            "component_hair": load_concept(out / "prepared" / "component_hair", 64)}
    ts, _ = build_training_sets(sets, {"concept": "person", "component_hair": "hair"}, "concept", w / "masks")
    person = np.asarray(Image.open(w / "masks" / "person" / "concept0.png").resize((64, 64), Image.NEAREST)) > 0
    hair = np.asarray(Image.open(w / "masks" / "hair" / "concept0.png").resize((64, 64), Image.NEAREST)) > 0
    got = ts[0].masks[0, 0].numpy() > 0
    assert (got & hair).sum() <= 8 and (got ^ (person & ~hair)).mean() < 0.03  # resizing edges only
    assert ts[1].masks[0, 0].numpy().sum() > 0


def test_a_component_folder_without_usable_images_is_one_line(world, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(empty / "x.png")  # no mask for "beard": left out
    code = main(["tailor", "train", "--concept", f"person={world / 'concept'}", "--component", f"beard={empty}",
                 "--out", str(tmp_path / "run"), "--preset", "smoke", "--masks", str(world / "masks"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "beard" in err and "no usable image" in err
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "DONE").exists()


@pytest.mark.parametrize("args, needle", [
    (["--concept", "person"], "CLASS=FOLDER"),
    (["--concept", "person=/nonexistent/x", "--component", "hair=/nonexistent/y"], "not found"),
    (["--concept", "hair=/a", "--component", "hair=/b"], "different class words"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, needle):
    code = main(["tailor", "train", *args, "--out", str(tmp_path / "r"), "--preset", "smoke", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_registry_entries_and_ablation_switches():
    from magicstudio.methods import METHODS

    assert {"magictailor", "magictailor-no-dmdeg", "magictailor-no-dsbal", "magictailor-fixed-dmdeg"} <= set(METHODS)
    assert METHODS["magictailor-no-dmdeg"].make_config("smoke").use_dmdeg is False
    assert METHODS["magictailor-no-dsbal"].make_config("smoke").use_dsbal is False
    assert METHODS["magictailor-fixed-dmdeg"].make_config("smoke").dmdeg_dynamic is False
    assert METHODS["magictailor"].family == "magictailor-no-dsbal".rsplit("-no", 1)[0]
    with pytest.raises(UserError):
        make_config("smoke", warmup_steps=0, dsbal_steps=0)
