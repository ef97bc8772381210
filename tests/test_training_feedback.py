"""What training shows and does for a person: Ctrl-C leaves a checkpoint that `--resume` (the printed command)
continues bit-identically, the progress line's figures, sample grids during training, the loss picture."""

from __future__ import annotations

import os
import shlex
import signal

import pytest
import torch
from safetensors.torch import load_file

from magicstudio.cli.main import main
from magicstudio.methods.magicapture.train import MagiCapture
from magicstudio.training.feedback import Interrupts, Progress, Smoothed

LORA = "pytorch_lora_weights.safetensors"


def _args(demo_sets, out, *extra):
    return ["capture", "train", "--source", str(demo_sets[0]), "--reference", str(demo_sets[1]), "-o", str(out),
            "--model", "tiny", "--preset", "smoke", "--ti-steps", "3", "--lora-steps", "3", "--resolution", "64",
            "--checkpoint-every", "100", "--deterministic", "--set", "sample_steps=2", "--set", "face_encoder=tiny",
            "--set", "grad_accum=2", "-q", *extra]


def _weights(run):
    lora = load_file(str(run / LORA))
    emb = {p.name: load_file(str(p)) for p in sorted((run / "embeddings").glob("*.safetensors"))}
    return lora, emb


def _same(a, b) -> bool:
    (la, ea), (lb, eb) = a, b
    return (la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la) and ea.keys() == eb.keys()
            and all(torch.equal(ea[n][k], eb[n][k]) for n in ea for k in ea[n]))


@pytest.fixture(scope="module")
def uninterrupted(demo_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("fb") / "a"
    assert main(_args(demo_sets, out)) == 0
    return _weights(out)


@pytest.mark.parametrize("when", [
    ("micro", 4, 1),     # KeyboardInterrupt in the 2nd micro-step of step 5 (mid gradient accumulation; lora)
    ("signal", 2, 0),    # a real SIGINT during step 3's first micro-step (textual inversion)
    ("critical", 3, 0),  # SIGINT inside the update of step 4 (the phase's first LoRA step): waits for its end
])
def test_ctrl_c_checkpoints_and_resume_is_bit_identical(demo_sets, tmp_path, capsys, monkeypatch, uninterrupted, when):
    kind, at, micro = when
    real_step, real_after = MagiCapture.micro_step, getattr(MagiCapture, "after_optimizer_step", None)
    calls = {"n": 0}

    def micro_step(self, phase, step):
        calls["n"] += 1
        if step == at and kind != "critical" and calls["n"] == 2 * at + micro + 1:
            if kind == "signal":
                os.kill(os.getpid(), signal.SIGINT)  # the handler raises here, as a terminal's Ctrl-C would
            else:
                raise KeyboardInterrupt
        return real_step(self, phase, step)

    def after(self, phase, lr):
        if kind == "critical" and self._fb_step == at:
            os.kill(os.getpid(), signal.SIGINT)
        if real_after is not None:
            real_after(self, phase, lr)

    monkeypatch.setattr(MagiCapture, "micro_step", micro_step)
    if kind == "critical":
        orig = real_step

        def counting(self, phase, step):
            self._fb_step = step
            return orig(self, phase, step)

        monkeypatch.setattr(MagiCapture, "micro_step", counting)
        monkeypatch.setattr(MagiCapture, "after_optimizer_step", after, raising=False)
    out = tmp_path / "b"
    capsys.readouterr()
    rc = main(_args(demo_sets, out))
    err = capsys.readouterr().err
    assert rc == 130, err
    expected = at + 1 if kind == "critical" else at  # the update Ctrl-C arrived in finished first
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step-{expected:06d}"], (ckpts, err)
    assert f"interrupted at step {expected}/6" in err
    command = err.split("continue with: ", 1)[1].splitlines()[0]
    argv = shlex.split(command)
    assert argv[0] == "magicstudio" and argv[-1] == "--resume" and argv.count("--resume") == 1
    monkeypatch.setattr(MagiCapture, "micro_step", real_step)
    if kind == "critical":
        if real_after is None:
            monkeypatch.delattr(MagiCapture, "after_optimizer_step")
        else:
            monkeypatch.setattr(MagiCapture, "after_optimizer_step", real_after)
    assert main(argv[1:]) == 0  # the printed command, as printed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    assert _same(_weights(out), uninterrupted)
    assert (out / "loss.png").is_file()


def test_interrupts_wait_for_the_critical_block():
    seen = []
    with pytest.raises(KeyboardInterrupt):
        it = Interrupts().install()
        try:
            with it.critical():
                os.kill(os.getpid(), signal.SIGINT)
                seen.append("finished the block")  # not cut short
        finally:
            it.restore()
    assert seen == ["finished the block"]


def test_progress_line_has_rate_eta_and_smoothed_loss(monkeypatch):
    import io

    import magicstudio.training.feedback as fb

    now = [0.0]
    monkeypatch.setattr(fb.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    bar = Progress(total=10, done=0, enabled=True, every=10.0, stream=stream)
    now[0] = 2.0
    bar.update(1, "lora", 1.0)   # printed: the first step (2 s/it, 9 steps left: ETA 18 s)
    now[0] = 4.0
    bar.update(2, "lora", 3.0)   # not printed: < 10 s since the last line
    now[0] = 20.0
    bar.update(10, "lora", 2.0)  # printed: the last step
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    s = Smoothed()
    want = [s.update(x) for x in (1.0, 3.0, 2.0)][-1]
    assert lines[0].startswith("[1/10] lora") and "2.0 s/it" in lines[0] and "ETA 00:00:18" in lines[0]
    assert lines[1].startswith("[10/10] lora") and f"loss {want:.4f}" in lines[1]
    assert abs(Smoothed().update(5.0) - 5.0) < 1e-12  # bias-corrected: the first value is itself


def test_sample_prompts_write_grids_during_training(demo_sets, tmp_path):
    from PIL import Image

    out = tmp_path / "s"
    rc = main(_args(demo_sets, out, "--sample-every", "2", "--sample-prompt", "a <v1> person",
                    "--sample-prompt", "a cat in the style of <v2>", "--sample-prompt", "a dog"))
    assert rc == 0
    names = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert names == ["step-000002.png", "step-000004.png", "step-000006.png"]
    assert Image.open(out / "samples" / "step-000002.png").size == (2 * 64, 3 * 64)  # a row per prompt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples")] == [2, 4]
