"""The learning-rate schedule within a phase comes from diffusers' get_scheduler, and the loop uses it: the lr that
metrics.jsonl records at each step is the schedule's value (resume replays the schedule: tests/test_capture.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from magicstudio.errors import UserError
from magicstudio.training.loop import make_lr_scheduler


def _lrs(kind, steps, warmup=0, lr=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = make_lr_scheduler(opt, kind, steps, warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_by_hand():
    assert _lrs("constant", 4) == [1.0] * 4
    assert _lrs("constant", 4, warmup=2) == [0.0, 0.5, 1.0, 1.0]
    assert _lrs("linear", 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert _lrs("linear", 4, warmup=2) == pytest.approx([0.0, 0.5, 1.0, 0.5])
    cos = _lrs("cosine", 4)
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    with pytest.raises(UserError, match="cosine"):
        _lrs("exponential", 4)


def test_the_loop_follows_the_schedule_in_each_phase(demo_sets, tmp_path):
    from magicstudio.methods.magicapture import make_config, run_training

    kw = dict(ti_steps=4, lora_steps=4, resolution=64, checkpoint_every=2, lr_schedule="linear", lr_warmup_steps=2,
              ti_lr=1e-2, lora_lr=1e-3, deterministic=True, sample_steps=2)
    run = run_training(*demo_sets, tmp_path / "run", make_config("smoke", **kw), progress=False)
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    # the lr logged after step k is the one the next step uses (the scheduler has stepped): phase-relative
    expect = [1e-2 * f for f in (0.5, 1.0, 0.5, 0.0)] + [1e-3 * f for f in (0.5, 1.0, 0.5, 0.0)]
    assert [r["lr"] for r in records] == pytest.approx(expect)
    with pytest.raises(UserError, match="lr_schedule"):
        make_config("smoke", lr_schedule="step")


def test_resume_mid_phase_replays_the_schedule(demo_sets, tmp_path, monkeypatch):
    """Killed in the warm-up of phase 1 (after the step-2 checkpoint), resumed: the same lrs and the same weights."""
    from safetensors.torch import load_file

    from magicstudio.methods.magicapture import make_config, run_training
    from magicstudio.methods.magicapture.train import MagiCapture

    kw = dict(ti_steps=4, lora_steps=4, resolution=64, checkpoint_every=2, lr_schedule="cosine", lr_warmup_steps=3,
              ti_lr=1e-2, lora_lr=1e-3, deterministic=True, sample_steps=2)
    a = run_training(*demo_sets, tmp_path / "a", make_config("smoke", **kw), progress=False).path
    real = MagiCapture.micro_step

    def crash(self, phase, step):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return real(self, phase, step)

    monkeypatch.setattr(MagiCapture, "micro_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(*demo_sets, tmp_path / "b", make_config("smoke", **kw), progress=False)
    monkeypatch.setattr(MagiCapture, "micro_step", real)
    b = run_training(*demo_sets, tmp_path / "b", make_config("smoke", **kw), resume=True, progress=False).path
    lrs = [[json.loads(x)["lr"] for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 8
    la, lb = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (a, b))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
