"""Speed and memory of a MagiCapture phase-2 training step (issue #3, "Speed and memory").

    python benchmarks/capture_speed.py [--model tiny|sd15-random] [--size 128|256] [--repeats N] [--quick]

What is measured (one process, variants alternated A B C ... A B C ..., the order rotated every round, the
method's generator re-seeded identically before every block so all variants see the same images and noise;
each figure is the median of per-step wall times; a step = micro_step + backward + clip + AdamW step):

  plain      plain masked-LoRA step: source/reference task, no AR, no ID, SDPA on every layer (no capture)
  noar       source task, attention capture on (the metrics need it), AR loss off   (cfg.use_ar=False)
  ar         source task, capture + AR loss                                          (cfg.use_ar=True)
  full:<t>   task t in source/reference/composed, capture + AR + identity loss (--face-encoder: the tiny
             random ArcFace on tiny, a random-weight ArcFace r100 on sd15-random), face-region decoding
             (cfg.id_region_decode=True); the identity loss acts on the composed task only
  idfull     composed task, as full:composed but decoding the whole latent (id_region_decode=False)
  id32       composed task, as full:composed with the decoder in float32 (decode_precision="fp32"; the default
             "auto" runs the frozen decoder in bfloat16 where the CPU/GPU has it natively)
  ar:composed  composed task, capture + AR, identity loss off (diagnostic: what the ID loss adds)

Ratios and the issue's targets:
  AR on / off (capture on in both)             ar / noar                         <= 1.05
  AR capture+loss / SDPA (plain)               ar / plain:source                 <= 1.05 (the stricter reading)
  composed+ID+AR / plain masked LoRA           full:composed / plain             <= 1.30
  3 tasks drawn equally / plain                mean(full:*) / plain              <= 1.30
  ID step, region / full decoding              full:composed / idfull            (reported)
  composed step with a float32 decoder / plain id32 / plain                      (reported)
  peak RSS MagiCapture / plain LoRA            fresh subprocess per variant      <= 1.15

The task is forced without touching src/: during ``micro_step`` the ``torch`` name of the training module is
replaced by a proxy whose first ``randint`` (the task draw) returns the wanted index (the real draw is still
consumed, so the RNG stream is unchanged); the returned ``StepOutput.task`` is checked.

Models: ``tiny`` (built-in, 128 px) and ``sd15-random`` (SD1.5's UNet/VAE/CLIP-L architecture, random
weights, 256 px). Without --model both run; ``--quick`` runs only tiny with fewer rounds. The glibc allocator
tweak from ENVIRONMENT.md is applied by re-executing this script (``--no-malloc-tweak`` to measure without).
Progress goes to stderr; the tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

MALLOC_TWEAK = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DIFFUSERS_VERBOSITY": "error",
             "TRANSFORMERS_VERBOSITY": "error", "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3",
             "TQDM_DISABLE": "1"}
DEFAULT_SIZE = {"tiny": 128, "sd15-random": 256}
DEFAULT_REPEATS = {"tiny": 15, "sd15-random": 3}  # alternation rounds
DEFAULT_STEPS = {"tiny": 4, "sd15-random": 1}  # timed steps per variant per round
DEFAULT_MEM_STEPS = {"tiny": 6, "sd15-random": 3}  # steps in each memory subprocess
TASKS = ("source", "reference", "composed")
TARGETS = {"ar": 1.05, "composed": 1.3, "mix": 1.3, "memory": 1.15}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("diffusers", "transformers", "peft", "accelerate", "magicstudio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - older libraries
        pass


# --------------------------------------------------------------------------------------------- models
def build_sd15_random(seed: int = 0):
    """SD1.5's UNet / VAE / text encoder architecture with random weights (same FLOPs as the real model),
    assembled like ``models/tiny.py`` assembles the tiny model."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from magicstudio.models.components import Components
    from magicstudio.models.tiny import SCHEDULER_CONFIG
    from magicstudio.models.tokenizer import load_clip_tokenizer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    finally:
        torch.random.set_rng_state(state)
    for m in (unet, vae, text_encoder):
        m.eval()
    return Components(tokenizer=load_clip_tokenizer(), text_encoder=text_encoder, vae=vae, unet=unet,
                      scheduler=DDPMScheduler.from_config(SCHEDULER_CONFIG), source="sd15-random", resolution=512,
                      family="sd1", extra={"seed": seed})


def build_face_encoder(kind: str):
    """``tiny`` (the library's tiny random ArcFace) or ``r50-random``/``r100-random``: the published IResNet
    architecture with random weights (the real network's FLOPs and memory; no weights are available offline)."""
    from magicstudio.models.face_encoder import load_face_encoder

    if kind == "tiny":
        return load_face_encoder("tiny")
    arch = kind.removesuffix("-random")
    import torch

    from magicstudio.models.face_encoder import ArcFaceEncoder
    from magicstudio.models.iresnet import IRESNET_LAYERS, IResNet

    if arch not in IRESNET_LAYERS:
        raise SystemExit(f"unknown --face-encoder {kind!r} (tiny, r50-random, r100-random)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = IResNet(IRESNET_LAYERS[arch], width=64, num_features=512)
        # random weights with the default BatchNorm statistics overflow to inf/NaN within 50 residual blocks;
        # set every BN's running statistics from random faces (as training would) so the loss is finite
        for m in backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average over the calibration batches
        torch.nn.Module.train(backbone, True)
        with torch.no_grad():
            for _ in range(2):
                backbone(torch.rand(8, 3, 112, 112) * 2 - 1)
        torch.nn.Module.train(backbone, False)
    encoder = ArcFaceEncoder(backbone, name=f"arcface-{arch}(random)")
    with torch.no_grad():
        if not bool(torch.isfinite(encoder.embed(torch.rand(1, 3, 112, 112) * 2 - 1)).all()):
            raise RuntimeError(f"the random {arch} face encoder gives non-finite embeddings")
    return encoder


def build_components(model: str):
    if model == "tiny":
        from magicstudio.models.base import load_base

        return load_base("tiny")
    if model == "sd15-random":
        return build_sd15_random()
    raise SystemExit(f"unknown --model {model!r} (tiny or sd15-random)")


# --------------------------------------------------------------------------------------------- data
def data_dirs(args) -> tuple[Path, Path]:
    """Prepared source/reference folders: the user's (--source/--reference), else the demo sets, prepared once
    into the magicstudio cache (mediapipe runs only on the first call)."""
    from magicstudio.data.prepare import is_prepared
    from magicstudio.training.personalize import prepared_dir
    from magicstudio.models.tokenizer import cache_dir

    root = cache_dir() / "bench-capture"
    if args.source and args.reference:
        return (prepared_dir(args.source, "source", root / "user", 512, progress=False),
                prepared_dir(args.reference, "reference", root / "user", 512, progress=False))
    if is_prepared(root / "prepared" / "source") and is_prepared(root / "prepared" / "reference"):
        return root / "prepared" / "source", root / "prepared" / "reference"
    from magicstudio.data.samples import make_demo_sets

    log("preparing the demo photo sets (once; cached in %s)" % root)
    src_raw, ref_raw = make_demo_sets(root / "raw")
    return (prepared_dir(src_raw, "source", root / "prepared", 512, progress=False),
            prepared_dir(ref_raw, "reference", root / "prepared", 512, progress=False))


# --------------------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class Variant:
    name: str
    task: str
    ar: bool = True
    id: bool = True
    region: bool = True
    capture: bool = True
    decode: str = "auto"  # decode_precision of the identity path's VAE decoder


TIMED = [
    Variant("plain:source", "source", ar=False, id=False, capture=False),
    Variant("plain:reference", "reference", ar=False, id=False, capture=False),
    Variant("noar", "source", ar=False),
    Variant("ar", "source"),  # == full:source (the identity loss only acts on the composed task)
    Variant("full:reference", "reference"),
    Variant("ar:composed", "composed", id=False),  # diagnostic: the composed task's cost without the ID loss
    Variant("full:composed", "composed"),
    Variant("idfull", "composed", region=False),
    Variant("id32", "composed", decode="fp32"),  # the same as full:composed with a float32 decoder
]
LABELS = {
    "plain:source": "plain masked LoRA, source task (SDPA, no AR/ID)",
    "plain:reference": "plain masked LoRA, reference task (SDPA, no AR/ID)",
    "noar": "source task, capture on, AR off (use_ar=False)",
    "ar": "source task, capture + AR (use_ar=True)",
    "full:reference": "reference task, capture + AR",
    "ar:composed": "composed task, AR, no ID (diagnostic)",
    "full:composed": "composed task, AR + ID, region decode",
    "idfull": "composed task, AR + ID, full decode",
    "id32": "composed task, AR + ID, region decode in fp32",
}


class _ForceTask:
    """Stand-in for the ``torch`` module inside the training module during one ``micro_step``: the first
    ``randint`` (the task draw) returns ``index``; everything else is the real torch."""

    def __init__(self, torch_module, index: int, n_tasks: int):
        self._torch, self._index, self._n, self._done = torch_module, index, n_tasks, False

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def randint(self, *args, **kwargs):
        real = self._torch.randint(*args, **kwargs)  # consume the draw: the RNG stream stays as in training
        if self._done:
            return real
        self._done = True
        if args[0] != self._n:
            raise RuntimeError(f"expected the task draw randint({self._n}, ...), got randint{args}: "
                               "micro_step changed, update benchmarks/capture_speed.py")
        return self._torch.full_like(real, self._index)


def make_method(model: str, size: int, preset: str, use_id: bool, use_composed: bool = True, face_encoder: str = "tiny"):
    import torch

    from magicstudio.attention.capture import CaptureProcessor
    from magicstudio.training.concepts import load_concept
    from magicstudio.methods.magicapture import train as T
    from magicstudio.methods.magicapture.config import make_config
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:  # pragma: no cover
        from diffusers.models.attention_processor import AttnProcessor as AttnProcessor2_0

    class BenchCapture(T.MagiCapture):
        """MagiCapture whose phase-2 step runs a chosen task under a chosen variant of the configuration."""

        def bench_setup(self) -> None:
            groups = self._setup_lora()
            self.params = [p for g in groups for p in g["params"]]
            self.optimizer = torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)
            unet = self.comps.unet
            self._procs_capture = dict(unet.attn_processors)
            self._procs_sdpa = {k: (AttnProcessor2_0() if isinstance(v, CaptureProcessor) else v)
                                for k, v in self._procs_capture.items()}
            self._saved_identity = self.source_identity
            self._base_cfg = self.cfg
            self._capture_on = True
            self.id_calls = 0

        def configure(self, v: Variant) -> None:
            if v.id and self._saved_identity is None and v.task == "composed":
                raise RuntimeError("variant needs the identity loss but no face encoder was loaded")
            self.cfg = replace(self._base_cfg, use_ar=v.ar, id_region_decode=v.region, decode_precision=v.decode)
            self.source_identity = self._saved_identity if v.id else None
            if v.capture != self._capture_on:
                self.comps.unet.set_attn_processor(dict(self._procs_capture if v.capture else self._procs_sdpa))
                self._capture_on = v.capture

        def step(self, task: str):
            tasks = T.TASKS_LORA if self.cfg.use_composed else T.TASKS_TI
            saved_torch, saved_stack = T.torch, T.stack_token_maps
            T.torch = _ForceTask(torch, tasks.index(task), len(tasks))
            if not self._capture_on:  # SDPA everywhere: no maps; the (unused) metrics see zeros
                size = self.latent_size

                def stack(store, s=None):
                    return saved_stack(store, s) if store.maps else torch.zeros(1, 1, 1, size, size, 2)

                T.stack_token_maps = stack
            try:
                out = self.micro_step("lora", 0)
            finally:
                T.torch, T.stack_token_maps = saved_torch, saved_stack
            if out.task != task:
                raise RuntimeError(f"forced task {task!r} but micro_step ran {out.task!r}")
            if "loss_id" in out.terms:
                self.id_calls += 1
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return out

    comps = build_components(model)
    cfg = make_config(preset, model=model, resolution=size, use_id=use_id, use_composed=use_composed,
                      face_encoder=face_encoder if use_id else None)
    src_dir, ref_dir = data_dirs(ARGS)
    source, reference = load_concept(src_dir, size), load_concept(ref_dir, size)
    encoder = build_face_encoder(face_encoder) if cfg.use_id else None
    method = BenchCapture(cfg, comps, source, reference, encoder)
    method.bench_setup()
    return method


# --------------------------------------------------------------------------------------------- timing
def time_variants(method, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v.name: [] for v in TIMED}
    n = len(TIMED)
    for r in range(-warmup, rounds):
        order = TIMED[r % n:] + TIMED[:r % n]  # rotate: every variant takes every position
        for v in order:
            method.configure(v)
            method.generator.manual_seed(10_000 + r)  # same images, noise and prompts for every variant
            for _ in range(steps):
                t0 = time.perf_counter()
                method.step(v.task)
                dt = time.perf_counter() - t0
                if r >= 0:
                    times[v.name].append(dt)
        if r >= 0:
            log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{k}={statistics.median(x):.3f}" for k, x in times.items()))
    return times


# --------------------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def mem_child(args) -> None:
    """Run in a fresh process: set up one variant, then N steps; report peak RSS (bytes) as JSON."""
    import torch

    kind = args.mem_child
    plain = kind == "plain"
    method = make_method(args.model, args.size, args.preset, use_id=not plain, use_composed=not plain,
                         face_encoder=args.face_encoder)
    if plain:
        method.configure(Variant("plain", "source", ar=False, id=False, capture=False))
        tasks = ("source", "reference")
    else:
        method.configure(Variant("magicapture", "composed", region=(kind != "magicapture-fulldecode"),
                                 decode="fp32" if kind == "magicapture-fp32" else "auto"))
        tasks = TASKS
    torch.set_grad_enabled(True)
    setup_peak, rss_ready = _status("VmHWM"), _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the training peak alone
        reset = True
    except OSError:
        reset = False
    method.generator.manual_seed(1)
    for i in range(args.mem_steps):
        method.step(tasks[i % len(tasks)])
    train_peak = _status("VmHWM")
    print("MEMJSON " + json.dumps({"kind": kind, "setup_peak": setup_peak, "rss_ready": rss_ready,
                                    "train_peak": train_peak, "peak": max(setup_peak, train_peak),
                                    "reset": reset, "id_calls": method.id_calls}), flush=True)


def measure_memory(model: str, size: int, steps: int, kinds: list[str]) -> dict[str, dict]:
    out = {}
    for kind in kinds:
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", kind, "--model", model, "--size", str(size),
               "--mem-steps", str(steps), "--preset", ARGS.preset, "--face-encoder", ARGS.face_encoder]
        if ARGS.source and ARGS.reference:
            cmd += ["--source", ARGS.source, "--reference", ARGS.reference]
        if ARGS.no_malloc_tweak:
            cmd.append("--no-malloc-tweak")
        if ARGS.threads:
            cmd += ["--threads", str(ARGS.threads)]
        log(f"  memory: {kind} ({steps} steps in a fresh process)")
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory subprocess {kind} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        out[kind] = json.loads(line[len("MEMJSON "):]) | {"seconds": time.time() - t0}
    return out


# --------------------------------------------------------------------------------------------- report
def verdict(value: float, target: float | None) -> str:
    if target is None:
        return "report"
    return "PASS" if value <= target else "FAIL"


def bench_model(model: str, size: int, rounds: int, steps: int, warmup: int, mem_steps: int, do_memory: bool) -> dict:
    import torch

    from magicstudio.models.precision import frozen_dtype

    log(f"[{model} @ {size}px] building the model and the method ...")
    t0 = time.time()
    method = make_method(model, size, ARGS.preset, use_id=True, face_encoder=ARGS.face_encoder)
    DECODE_DTYPE[model] = frozen_dtype("auto", "cpu", method.comps.vae.decoder)
    log(f"[{model} @ {size}px] ready in {time.time() - t0:.0f} s; timing {len(TIMED)} variants x "
        f"{rounds} rounds x {steps} step(s) (+{warmup} warm-up round)")
    times = time_variants(method, rounds, steps, warmup)
    id_calls = method.id_calls
    del method
    med = {k: statistics.median(v) for k, v in times.items()}
    plain = (med["plain:source"] + med["plain:reference"]) / 2
    mix = (med["ar"] + med["full:reference"] + med["full:composed"]) / 3
    ratios = [
        ("AR on / off, source task (capture on in both)", med["ar"] / med["noar"], TARGETS["ar"]),
        ("AR capture+loss / SDPA, source task", med["ar"] / med["plain:source"], TARGETS["ar"]),
        ("composed+ID+AR step / plain masked-LoRA step", med["full:composed"] / plain, TARGETS["composed"]),
        ("3 tasks drawn equally (AR+ID) / plain", mix / plain, TARGETS["mix"]),
        ("composed+AR, no ID / plain (diagnostic)", med["ar:composed"] / plain, None),
        ("ID step: region decode / full decode", med["full:composed"] / med["idfull"], None),
        ("composed+ID+AR, fp32 decoder / plain", med["id32"] / plain, None),
        ("ID step: auto / fp32 decoder precision", med["full:composed"] / med["id32"], None),
    ]
    mem = None
    if do_memory:
        log(f"[{model} @ {size}px] peak memory, one fresh subprocess per variant")
        mem = measure_memory(model, size, mem_steps,
                             ["plain", "magicapture", "magicapture-fp32", "magicapture-fulldecode"])
        ratios.append(("peak RSS MagiCapture / plain LoRA", mem["magicapture"]["peak"] / mem["plain"]["peak"],
                       TARGETS["memory"]))
        ratios.append(("peak RSS, fp32 decoder / plain LoRA", mem["magicapture-fp32"]["peak"] / mem["plain"]["peak"],
                       None))
        ratios.append(("peak RSS, full decode / plain LoRA", mem["magicapture-fulldecode"]["peak"] / mem["plain"]["peak"],
                       None))

    tweak = "on" if all(os.environ.get(k) == v for k, v in MALLOC_TWEAK.items()) else "off"
    print()
    print(f"== MagiCapture phase-2 step: model {model}, {size} px, preset {ARGS.preset}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, malloc tweak {tweak}, face encoder {ARGS.face_encoder}, "
          f"decoder precision auto -> {DECODE_DTYPE.get(model) or 'float32'}")
    print(f"   {rounds} alternation rounds x {steps} step(s) per variant; median of per-step times "
          f"(identity loss computed in {id_calls} composed steps)")
    w = 52
    print(f"{'variant':<{w}} {'median s/step':>13} {'p25-p75':>15} {'n':>4}")
    for v in TIMED:
        xs = sorted(times[v.name])
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0], xs[0], xs[0]]
        print(f"{LABELS[v.name]:<{w}} {med[v.name]:>13.4f} {q[0]:>7.3f}-{q[2]:<7.3f} {len(xs):>4}")
    print(f"{'plain masked LoRA (mean of source, reference)':<{w}} {plain:>13.4f}")
    print(f"{'MagiCapture, 3 tasks drawn equally (mean)':<{w}} {mix:>13.4f}")
    print()
    print(f"{'ratio':<{w}} {'value':>7} {'target':>8}  result")
    for name, value, target in ratios:
        print(f"{name:<{w}} {value:>7.3f} {('<= %.2f' % target) if target else '-':>8}  {verdict(value, target)}")
    if mem:
        print()
        print(f"{'memory subprocess':<{w}} {'peak RSS':>9} {'ready':>9} {'train peak':>11}  (GB; 'ready' = after setup)")
        for kind, label in (("plain", "plain masked LoRA (SDPA, no AR/ID)"),
                            ("magicapture", "MagiCapture (capture+AR+ID, region decode)"),
                            ("magicapture-fp32", "MagiCapture, decoder in fp32"),
                            ("magicapture-fulldecode", "MagiCapture, ID with full decode")):
            m = mem[kind]
            print(f"{label:<{w}} {m['peak'] / 2**30:>9.3f} {m['rss_ready'] / 2**30:>9.3f} {m['train_peak'] / 2**30:>11.3f}")
        p = mem["plain"]
        for kind in ("magicapture", "magicapture-fp32", "magicapture-fulldecode"):
            m = mem[kind]
            extra_plain = p["train_peak"] - p["rss_ready"]
            extra = m["train_peak"] - m["rss_ready"]
            print(f"   {kind}: training-time growth above setup {extra / 2**20:.0f} MB vs plain {extra_plain / 2**20:.0f} MB")
    sys.stdout.flush()
    return {"model": model, "size": size, "median": med, "ratios": {n: v for n, v, _ in ratios}, "memory": mem}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "sd15-random"], help="default: both (tiny only with --quick)")
    p.add_argument("--size", type=int, help="training resolution (default: tiny 128, sd15-random 256)")
    p.add_argument("--repeats", type=int, help="alternation rounds (default: tiny 15, sd15-random 3; --quick: 5)")
    p.add_argument("--steps", type=int, help="timed steps per variant per round (default: tiny 4, sd15-random 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--mem-steps", type=int, help="steps per memory subprocess (default: tiny 6, sd15-random 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true", help="tiny only, 5 rounds")
    p.add_argument("--preset", default="paper", help="MagiCapture preset for the settings (default paper)")
    p.add_argument("--face-encoder", help="identity network: tiny (default for tiny) or r50-random / r100-random "
                   "(ArcFace IResNet architecture, random weights; default for sd15-random: r100-random, the authors' R)")
    p.add_argument("--source", help="source photo folder (raw or prepared); default: the demo set")
    p.add_argument("--reference", help="reference photo folder (raw or prepared); default: the demo set")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--no-malloc-tweak", action="store_true", help="do not apply the glibc allocator tweak")
    p.add_argument("--mem-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = None
DECODE_DTYPE: dict = {}


def main(argv=None) -> int:
    global ARGS
    ARGS = parse_args(argv)
    env_missing = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    if not ARGS.no_malloc_tweak:
        env_missing |= {k: v for k, v in MALLOC_TWEAK.items() if os.environ.get(k) != v}
    if env_missing:  # glibc reads the allocator settings at start-up: re-exec with them
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], os.environ | env_missing)
    quiet()
    if ARGS.threads:
        import torch

        torch.set_num_threads(ARGS.threads)
    if ARGS.mem_child:
        mem_child(ARGS)
        return 0
    models = [ARGS.model] if ARGS.model else (["tiny"] if ARGS.quick else ["tiny", "sd15-random"])
    if ARGS.quick and ARGS.model == "sd15-random":
        log("--quick runs only tiny; ignoring --quick for the sd15-random model")
    results = []
    user_encoder = ARGS.face_encoder
    for model in models:
        ARGS.face_encoder = user_encoder or ("r100-random" if model == "sd15-random" else "tiny")
        quick = ARGS.quick and model == "tiny"
        size = ARGS.size or DEFAULT_SIZE[model]
        rounds = ARGS.repeats or (5 if quick else DEFAULT_REPEATS[model])
        steps = ARGS.steps or DEFAULT_STEPS[model]
        mem_steps = ARGS.mem_steps or (3 if quick else DEFAULT_MEM_STEPS[model])
        results.append(bench_model(model, size, rounds, steps, ARGS.warmup, mem_steps, not ARGS.no_memory))
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
