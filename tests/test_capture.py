"""MagiCapture end to end on the tiny model: placement, phases, resume, divergence, reload, mechanisms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from magicstudio.errors import UserError
from magicstudio.training.concepts import load_concept
from magicstudio.training.lora import lora_module_names
from magicstudio.methods.magicapture import make_config, run_training
from magicstudio.methods.magicapture.train import MagiCapture
from magicstudio.training.runs import RunDir
from magicstudio.training.loop import TrainingDiverged, train

FAST = dict(ti_steps=3, lora_steps=5, checkpoint_every=2, resolution=64, sample_steps=2, face_encoder="tiny")


def _method(tiny, demo_sets, **kw):
    cfg = make_config("smoke", **{**FAST, **kw})
    src = load_concept(demo_sets[0], cfg.resolution)
    ref = load_concept(demo_sets[1], cfg.resolution)
    from magicstudio.models.face_encoder import load_face_encoder

    return MagiCapture(cfg, tiny, src, ref, load_face_encoder(cfg.face_encoder))


@pytest.mark.parametrize("preset, unet_kinds, text", [
    ("paper", {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}, False),
    ("official", {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                  "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj"}, True),
])
def test_lora_lands_exactly_on_the_preset_modules(tiny, demo_sets, preset, unet_kinds, text):
    from magicstudio.methods.magicapture import config as C

    overrides = {k: v for k, v in C.PRESETS[preset].items()}
    m = _method(tiny, demo_sets, **{k: v for k, v in overrides.items() if k in ("lora_targets", "text_lora")})
    m._setup_lora()
    names = lora_module_names(m.comps.unet)
    kinds = {n.split("transformer_blocks.0.")[1] for n in names}
    assert kinds == unet_kinds
    n_blocks = len([n for n, _ in tiny.unet.named_modules() if n.endswith("transformer_blocks.0")])
    assert len(names) == n_blocks * len(unet_kinds)
    te_names = lora_module_names(m.comps.text_encoder)
    assert bool(te_names) == text
    if text:
        assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") for n in te_names)


def test_phase1_changes_only_the_new_rows(tiny, demo_sets, tmp_path):
    unet_before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    table_before = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    m = _method(tiny, demo_sets, lora_steps=0, ti_steps=4)
    rows_before = m.embedding.rows.detach().clone()
    _train(m, RunDir(tmp_path / "run").create())
    assert all(torch.equal(v, tiny.unet.state_dict()[k]) for k, v in unet_before.items())
    assert torch.equal(m.embedding.base.weight[: table_before.shape[0]], table_before)
    assert not torch.equal(m.embedding.rows, rows_before)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["textual_inversion"] * 4
    assert all(r["task"] in ("source", "reference") and "loss_attn" not in r for r in records)


def _train(m, run, **kw):
    cfg = m.cfg
    return train(m, run, grad_accum=cfg.grad_accum, checkpoint_every=cfg.checkpoint_every, progress=False,
                 tensorboard=False, **kw)


def _files(run):
    from safetensors.torch import load_file

    return load_file(str(run / "pytorch_lora_weights.safetensors")), load_file(str(run / "embeddings" / "v1.safetensors"))


def test_resume_after_a_crash_gives_identical_weights(tiny, demo_sets, tmp_path, monkeypatch):
    """Needs bit-identical weights, so it asks for them (deterministic=True: one CPU thread)."""
    import copy

    base = copy.deepcopy(tiny)
    m1 = _method(tiny, demo_sets)
    _train(m1, RunDir(tmp_path / "a").create(), deterministic=True)

    m2 = _method(copy.deepcopy(base), demo_sets)
    real = MagiCapture.micro_step

    def crash(self, phase, step):  # a crash, not Ctrl-C (which checkpoints step 5: test_training_feedback.py)
        if step == 5:
            raise RuntimeError("killed")
        return real(self, phase, step)

    monkeypatch.setattr(MagiCapture, "micro_step", crash)
    with pytest.raises(RuntimeError):
        _train(m2, RunDir(tmp_path / "b").create(), deterministic=True)
    monkeypatch.setattr(MagiCapture, "micro_step", real)
    assert RunDir(tmp_path / "b").latest_checkpoint()[0] == 4
    with pytest.raises(UserError, match="--resume"):
        _train(_method(copy.deepcopy(base), demo_sets), RunDir(tmp_path / "b"))
    m3 = _method(copy.deepcopy(base), demo_sets)  # a fresh process: new modules, state from disk
    _train(m3, RunDir(tmp_path / "b"), resume=True, deterministic=True)
    (la, ea), (lb, eb) = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert torch.equal(ea["<v1>"], eb["<v1>"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, demo_sets, tmp_path, monkeypatch):
    m = _method(tiny, demo_sets)
    real = MagiCapture.micro_step

    def poison(self, phase, step):
        out = real(self, phase, step)
        if step == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MagiCapture, "micro_step", poison)
    run = RunDir(tmp_path / "run").create()
    with pytest.raises(TrainingDiverged, match="step-000004"):
        _train(m, run)
    assert run.latest_checkpoint()[0] == 4 and not run.is_done()


@pytest.fixture(scope="module")
def finished_run(demo_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "run"
    cfg = make_config("smoke", **FAST)
    run_training(demo_sets[0], demo_sets[1], out, cfg, progress=False)
    return out


def test_run_folder_contract(finished_run):
    run = RunDir(finished_run)
    assert run.is_done()
    cfg = run.read_config()
    assert cfg["tokens"] == ["<v1>", "<v2>"] and cfg["model"] == "tiny" and cfg["resolution"] == 64
    records = run.read_metrics()
    assert [r["step"] for r in records] == list(range(1, 9))
    lora = [r for r in records if r["phase"] == "lora"]
    for r in records:
        assert {"step", "phase", "task", "loss"} <= set(r)
    assert any("attn_spill_v1" in r and "attn_outside_v1" in r for r in lora)
    for name in ("pytorch_lora_weights.safetensors", "embeddings/v1.safetensors", "embeddings/v2.safetensors",
                 "a1111/v1.safetensors"):
        assert (finished_run / name).is_file(), name
    assert list((finished_run / "a1111").glob("*_lora.safetensors"))
    assert list((finished_run / "samples").glob("*.png"))


def test_default_trains_on_every_core_and_deterministic_on_one(tiny, demo_sets, tmp_path, monkeypatch):
    """Fast by default: training keeps the process's threads; --deterministic trains on one (then restores them).
    The run's config.yaml records which mode it used."""
    from magicstudio.cli.main import main

    seen = []
    real = MagiCapture.micro_step

    def spy(self, phase, step):
        seen.append(torch.get_num_threads())
        return real(self, phase, step)

    monkeypatch.setattr(MagiCapture, "micro_step", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        common = ["capture", "train", "--source", str(demo_sets[0]), "--reference", str(demo_sets[1]), "--preset",
                  "smoke", "--ti-steps", "1", "--lora-steps", "1", "--resolution", "64", "-q"]
        assert main(common + ["--out", str(tmp_path / "fast")]) == 0
        fast, seen[:] = list(seen), []
        assert main(common + ["--out", str(tmp_path / "det"), "--deterministic"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert fast and set(fast) == {2} and set(seen) == {1}
    assert RunDir(tmp_path / "fast").read_config()["deterministic"] is False
    assert RunDir(tmp_path / "det").read_config()["deterministic"] is True


def test_resuming_a_finished_run_says_so(finished_run, capsys):
    run_training("unused", "unused", finished_run, make_config("smoke", **FAST), resume=True, progress=False)
    assert "already finished" in capsys.readouterr().out


def test_generate_equals_plain_diffusers_and_writes_parameters(finished_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from magicstudio.cli.main import main
    from magicstudio.training.generate import generate
    from magicstudio.models.schedulers import make_scheduler
    from magicstudio.models.tiny import write_tiny

    paths = generate(finished_run, tmp_path / "gen", num_images=1, seed=3, steps=4, save_attention=True)
    ours = Image.open(paths[0])
    assert "a photo of a <v1> person in the style of <v2>" in ours.info["parameters"]
    assert "Seed: 3" in ours.info["parameters"] and "Steps: 4" in ours.info["parameters"]
    assert (tmp_path / "gen" / "000-seed3-attention.png").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(write_tiny(tmp_path / "tiny")))
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.load_lora_weights(str(finished_run))
    for tok in ("v1", "v2"):
        pipe.load_textual_inversion(str(finished_run / "embeddings" / f"{tok}.safetensors"))
    plain = pipe("a photo of a <v1> person in the style of <v2>", num_inference_steps=4, guidance_scale=7.5,
                 height=64, width=64, generator=torch.Generator().manual_seed(3)).images[0]
    import numpy as np

    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(plain, dtype=np.int16))
    assert diff.max() <= 1

    assert main(["capture", "generate", str(finished_run), "--prompt", "a photo of <v9>", "-n", "1"]) == 2


def test_generate_with_postprocessing_keeps_the_raw_image(finished_run, tmp_path):
    from magicstudio.training.generate import generate

    paths = generate(finished_run, tmp_path / "gen", num_images=1, seed=1, steps=2, upscale=2, sr="lanczos")
    raw, post = Image.open(paths[0]), Image.open(tmp_path / "gen" / "000-seed1-post.png")
    assert post.size == (raw.width * 2, raw.height * 2)
    assert "Postprocess: upscale x2 (lanczos)" in post.info["parameters"]


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    from magicstudio.cli.main import main

    rc = main(["capture", "train", "--source", str(tmp_path / "nope"), "--reference", str(tmp_path / "nope"),
               "--out", str(tmp_path / "run"), "--preset", "smoke"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "Traceback" not in err
    assert main(["capture", "train", "--source", "a", "--reference", "b", "--out", "c", "--preset", "nope"]) == 2


def test_identity_landmarks_detect_mode(tiny, demo_sets, monkeypatch):
    """``id_landmarks="detect"``: landmarks come from the face analyzer run on the decoded x0_hat (close to the
    prepared landmarks on a real photo); no face found -> the identity loss is skipped (None), as the authors do;
    a found face -> the loss with exactly those landmarks."""
    from magicstudio.data.prepare import load_prepared
    from magicstudio.losses import identity_loss
    from magicstudio.models.face_align import align_faces

    m = _method(tiny, demo_sets, id_landmarks="detect", resolution=256)
    item = load_prepared(demo_sets[0])[0]
    image = torch.from_numpy(np.array(item.load_image())).permute(2, 0, 1)[None].float() / 127.5 - 1
    found = m._detect_landmarks(image)
    assert found is not None and (found[0] - torch.tensor(item.landmarks5, dtype=torch.float32)).abs().max() < 6

    z0_hat = torch.zeros(1, 4, m.latent_size, m.latent_size)
    box = torch.tensor([[60.0, 60.0, 190.0, 190.0]])
    lm = torch.full((1, 5, 2), 100.0)
    monkeypatch.setattr(m, "decode_face", lambda z, b, region, hint: (image, torch.zeros(2)))
    loss = m._identity(z0_hat, lm, box)
    expected = identity_loss(m.face_encoder.embed(align_faces(image.clamp(-1, 1), found, 112)), m.source_identity)
    assert loss is not None and torch.allclose(loss, expected, atol=1e-5)
    blank = torch.zeros_like(image)
    monkeypatch.setattr(m, "decode_face", lambda z, b, region, hint: (blank, torch.zeros(2)))
    assert m._identity(z0_hat, lm, box) is None
