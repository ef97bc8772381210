"""Two processes train as one (``accelerate launch``, gloo on this CPU): the ranks end bit-identical, and one
step on 2 ranks equals one single-process step on the two ranks' samples with gradient accumulation 2.

The 2-process runs go through ``tests/dist_worker.py``, which runs the real command line (or a registry entry)
and saves each rank's trainable state afterwards; the single-process reference replays the two ranks' data
streams (``distributed.rank_seed``) as the two micro-steps of one optimizer step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker

from magicstudio.errors import UserError
from magicstudio.training import distributed as D

ROOT = Path(__file__).resolve().parents[1]
# Float tolerances. (g0 + g1) / 2 against g0 / 2 + g1 / 2 through the backward pass: halving is exact in binary
# floating point, so on one thread per process these agree bit for bit (measured: 0). Any other input difference
# is amplified by Adam's first steps (update ~ lr * g / (|g| + 1e-8)): class images made on 2 threads instead of 1
# gave gradients 1e-5 of their scale apart and weights 3e-4, so both runs share the class images.
GRAD_TOL = 1e-5  # relative to max |exp_avg|
WEIGHT_TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(dump: Path, *args: str, processes: int = 2) -> float:
    """``accelerate launch`` of the worker on ``processes`` CPU processes (torchrun + gloo, 127.0.0.1, offline)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "dist_worker.py"), str(dump), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.time() - t0


def _ranks(dump: Path, n: int = 2) -> list[dict]:
    return [load_file(str(dump / f"rank{r}.safetensors")) for r in range(n)]


def _max_diff(a: dict, b: dict, keys) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def _reference(tmp_path: Path, train) -> dict:
    """One process, gradient accumulation 2, micro-step k drawing rank k's data."""
    dump = tmp_path / "reference"
    original = dist_worker.dump_after_training(dump, emulate_ranks=2)
    try:
        train()
    finally:
        from magicstudio.training import loop as training

        training.train = original
    return load_file(str(dump / "rank0.safetensors"))


def _moments(run: Path) -> list[torch.Tensor]:
    """The optimizer's first moments in the run's last checkpoint: (1 - beta1) * grad after one step, linear in
    the averaged gradients."""
    from magicstudio.training.runs import RunDir

    rd = RunDir(run)
    state = rd.load_checkpoint(rd.latest_checkpoint()[1])["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def _check(ranks: list[dict], ref: dict, run: Path, single: Path) -> tuple[float, float, float]:
    trainable = [k for k in ranks[0] if k not in ("generator", "frozen_table")]
    assert trainable and set(ranks[0]) == set(ranks[1]) == set(ref)
    between = _max_diff(ranks[0], ranks[1], trainable)
    assert between == 0.0, f"the ranks' trainable weights differ by up to {between}"
    assert torch.equal(ranks[0]["frozen_table"], ranks[1]["frozen_table"])
    assert torch.equal(ranks[0]["frozen_table"], ref["frozen_table"])  # every frozen embedding row untouched
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])  # each rank drew its own data
    m2, m1 = _moments(run), _moments(single)
    scale = max(float(m.abs().max()) for m in m1)
    grads = max(float((a - b).abs().max()) for a, b in zip(m2, m1, strict=True)) / scale
    weights = _max_diff(ranks[0], ref, trainable)
    print(f"max |rank0 - rank1| = {between}; 2 ranks vs 1 process with accumulation 2: gradient moments "
          f"{grads:.2g} of their scale, weights max abs diff {weights:.2g}")
    assert grads < GRAD_TOL, f"2 ranks vs one process with accumulation 2: gradients differ by {grads} of their scale"
    assert weights < WEIGHT_TOL, f"2 ranks vs one process with accumulation 2: weights differ by up to {weights}"
    return between, grads, weights


def test_magicapture_on_two_processes_is_one_process_with_accumulation_2(demo_sets, tmp_path, tiny):
    src, ref = str(demo_sets[0]), str(demo_sets[1])
    run = tmp_path / "run"
    seconds = launch(tmp_path / "dump", "cli", "capture", "train", "--source", src, "--reference", ref, "--out",
                     str(run), "--preset", "smoke", "--ti-steps", "1", "--lora-steps", "2", "--resolution", "64",
                     "--checkpoint-every", "1", "--deterministic", "-q")  # one thread per process: exact comparisons
    print(f"2-process MagiCapture run: {seconds:.1f} s")
    ranks = _ranks(tmp_path / "dump")
    assert any(k.startswith("unet.") for k in ranks[0]) and "embedding.rows" in ranks[0]

    from magicstudio.methods.magicapture import make_config, run_training

    cfg = make_config("smoke", ti_steps=1, lora_steps=2, resolution=64, checkpoint_every=1, grad_accum=2,
                      deterministic=True)
    reference = _reference(tmp_path, lambda: run_training(src, ref, tmp_path / "single", cfg, progress=False))
    _check(ranks, reference, run, tmp_path / "single")
    base = tiny.text_encoder.get_input_embeddings().weight
    assert torch.equal(ranks[0]["frozen_table"][:base.shape[0]], base)

    # only the main process wrote: one metrics line per step, one set of outputs; checkpoints hold both ranks' RNG
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 and (run / "DONE").is_file()
    last = json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())
    assert last["rng"]["processes"] == 2 and len(last["rng"]["ranks"]) == 1

    # a 2-process checkpoint is not resumed by one process (rank 1's data stream would be lost)
    (run / "DONE").unlink()
    same = make_config("smoke", ti_steps=1, lora_steps=2, resolution=64, checkpoint_every=1, deterministic=True)
    with pytest.raises(UserError, match="checkpointed by 2 process"):
        run_training(src, ref, run, same, resume=True, progress=False)


def test_a_baseline_on_two_processes_is_one_process_with_accumulation_2(demo_sets, tmp_path):
    from magicstudio.methods import METHODS

    src, ref = str(demo_sets[0]), str(demo_sets[1])
    # a linear schedule over 2 steps: a scheduler stepped once per process would reach lr 0 at step 2
    settings = dict(deterministic=True, steps=2, resolution=64, sample_steps=2, checkpoint_every=2, num_class_images=2, class_steps=2,
                    lr_schedule="linear")
    settings["class_dir"] = str(tmp_path / "classes")  # made by the 2-process run, read by the reference
    run = tmp_path / "run"
    seconds = launch(tmp_path / "dump", "api", "custom-diffusion", src, ref, str(run), json.dumps(settings))
    print(f"2-process Custom Diffusion run: {seconds:.1f} s")
    ranks = _ranks(tmp_path / "dump")
    assert any(k.startswith("kv.") for k in ranks[0])
    reference = _reference(tmp_path, lambda: METHODS["custom-diffusion"].train(src, ref, tmp_path / "single", "smoke", 0,
                                                                          grad_accum=2, **settings))
    _check(ranks, reference, run, tmp_path / "single")
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line)["lr"] for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == single and len(lrs) == 2
    assert len(list((tmp_path / "classes").rglob("*.png"))) == 2  # made once, by the main process


def test_rank_seeds():
    assert D.rank_seed(5, 0) == 5  # one process: the run's own seed, as before
    seeds = {D.rank_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert D.rank_seed(0, 1) not in {0, 1, 2}
