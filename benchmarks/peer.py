"""magicstudio against the diffusers example scripts, alternating in one run (issue 19).

    python benchmarks/peer.py [--steps N] [--resolution R] [--rounds K] [--model sd15-random|tiny]
                              [--diffusers-src DIR]

Builds the random-weight SD 1.5-architecture model once (a diffusers folder in the cache), then runs, round by
round and alternating, each job in a fresh subprocess (so peak RSS is the job's own):

    lora_step   diffusers examples/dreambooth/train_dreambooth_lora.py   vs  MagiCapture phase 2, plain masked LoRA
    ti_step     diffusers examples/textual_inversion/textual_inversion.py vs  MagiCapture phase 1 (new rows only)
    inference   plain diffusers pipeline + the same LoRA and tokens      vs  magicstudio's generate()
                (one R px image, 20 DDIM steps, guidance 7.5)
    peak_rss    the LoRA training processes

Batch 1, the same prepared photos, our default settings (every core, cross-attention LoRA rank 4), the peer's
defaults otherwise (its LoRA: rank 4 on every attention projection). Step time is the gap between optimizer
steps (a global optimizer hook), the first ``--warmup`` steps left out; inference times the pipeline call only.
Prints a table, then one ``peer-ratio NAME VALUE`` line per comparison (ours / peer; < 1: we are faster).

The example scripts are NOT part of the diffusers wheel: they are used unmodified, at the pinned tag below
(sha256 checked), from the cache folder; the first run fills it from the diffusers sdist on PyPI when that holds
them, else from ``--diffusers-src`` (a checkout of the diffusers repository, or its git directory). Their code
is never copied into this repository. They import torchvision, which has no CPU build here: a minimal stand-in
``torchvision.transforms`` (the handful of transforms they use, in PIL/torch) is written into the cache and put
first on the peer children's ``sys.path`` just before the script runs (after transformers has settled that
torchvision is absent, so its own image processors keep their PIL backend).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "v0.40.0"
SCRIPTS = {  # repository path -> sha256 at TAG
    "examples/dreambooth/train_dreambooth_lora.py": "97cf38b184cad2cc39e414f79b3f1a70cec3b97883350a4d2a3aa0e2533d7883",
    "examples/textual_inversion/textual_inversion.py": "117c575fb59a1150dd0e95faab23d92eb9031b55e2e9f4f63413647fa1f14a99",
}
PROMPT = "a photo of a <v1> person in the style of <v2>"

TORCHVISION_STUB = '''"""Stand-in for torchvision (no CPU build here), written by magicstudio's benchmarks/peer.py: only what the
diffusers example scripts use, with PIL and torch."""
'''
TRANSFORMS_STUB = '''"""The transforms the diffusers dreambooth / textual-inversion examples use (PIL in, tensor out)."""
import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """The shorter side to ``size`` (an int), as torchvision does."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, im):
        w, h = im.size
        s = self.size if isinstance(self.size, int) else min(self.size)
        nw, nh = (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)
        return im.resize((nw, nh), _PIL[InterpolationMode(self.interpolation).value])


def _size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class CenterCrop:
    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, im):
        th, tw = self.size
        w, h = im.size
        left, top = int(round((w - tw) / 2)), int(round((h - th) / 2))
        return im.crop((left, top, left + tw, top + th))


class RandomCrop(CenterCrop):
    def __call__(self, im):
        th, tw = self.size
        w, h = im.size
        left, top = random.randint(0, w - tw), random.randint(0, h - th)
        return im.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, x):
        if random.random() >= self.p:
            return x
        return x.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(x, Image.Image) else x.flip(-1)


class ToTensor:
    def __call__(self, im):
        a = np.asarray(im, dtype=np.float32) / 255.0
        return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x):
        return (x - self.mean) / self.std
'''


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    from magicstudio.models.tokenizer import cache_dir

    return cache_dir() / "peer"


# ------------------------------------------------------------------------------------------ the peer's scripts
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _from_sdist(dest: Path) -> dict[str, bytes]:
    import diffusers

    sdist = dest / "sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"diffusers=={diffusers.__version__}", "-d", str(sdist)]
    if subprocess.run(cmd, capture_output=True).returncode:
        return {}
    found = {}
    for tgz in sdist.glob("diffusers-*.tar.gz"):
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                for rel in SCRIPTS:
                    if member.name.endswith("/" + rel):
                        found[rel] = tar.extractfile(member).read()
    return found


def _from_source(src: Path) -> dict[str, bytes]:
    found = {}
    for rel in SCRIPTS:
        if (src / rel).is_file():
            found[rel] = (src / rel).read_bytes()
            continue
        git = ["git", f"--git-dir={src / '.git' if (src / '.git').exists() else src}", "show", f"{TAG}:{rel}"]
        out = subprocess.run(git, capture_output=True)
        if out.returncode == 0:
            found[rel] = out.stdout
    return found


def peer_scripts(diffusers_src: str | None) -> dict[str, Path]:
    """The two example scripts at ``TAG`` in the cache (checked by sha256), fetched on first use."""
    dest = cache_root() / f"diffusers-{TAG}"
    paths = {rel: dest / rel for rel in SCRIPTS}
    if all(p.is_file() and _sha(p.read_bytes()) == SCRIPTS[rel] for rel, p in paths.items()):
        return paths
    found = _from_sdist(dest)
    if diffusers_src and not all(_sha(found.get(r, b"")) == h for r, h in SCRIPTS.items()):
        found.update(_from_source(Path(diffusers_src).expanduser()))
    missing = [r for r, h in SCRIPTS.items() if _sha(found.get(r, b"")) != h]
    if missing:
        raise SystemExit(f"peer.py: the diffusers {TAG} example scripts ({', '.join(missing)}) are not in the "
                         f"diffusers sdist on PyPI; pass --diffusers-src with a checkout of the diffusers repository "
                         f"(or its git directory) that has the tag {TAG}")
    for rel, p in paths.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(found[rel])
    return paths


def torchvision_stub() -> Path:
    root = cache_root() / "stubs"
    (root / "torchvision").mkdir(parents=True, exist_ok=True)
    (root / "torchvision" / "__init__.py").write_text(TORCHVISION_STUB)
    (root / "torchvision" / "transforms.py").write_text(TRANSFORMS_STUB)
    return root


# ------------------------------------------------------------------------------------------ model and data
def model_dir(kind: str) -> Path:
    """The base model as a diffusers folder, built once (random weights, seed 0)."""
    out = cache_root() / f"model-{kind}"
    if (out / "model_index.json").is_file():
        return out
    log(f"building the {kind} model once into {out}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "tiny":
        from magicstudio.models.tiny import write_tiny

        write_tiny(tmp)
    else:
        sys.path.insert(0, str(HERE))
        from capture_speed import build_sd15_random

        comps = build_sd15_random()
        comps.pipeline(scheduler=comps.inference_scheduler("pndm")).save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(out)
    return out


def data_dirs() -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE))
    from capture_speed import data_dirs as prepared

    return prepared(argparse.Namespace(source=None, reference=None))


# ------------------------------------------------------------------------------------------ one job (a child)
def child(job: str, args) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
    infer: list[float] = []
    from diffusers import StableDiffusionPipeline

    call = StableDiffusionPipeline.__call__

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return call(self, *a, **kw)
        finally:
            infer.append(time.perf_counter() - t0)

    StableDiffusionPipeline.__call__ = timed
    steps = args.warmup + args.steps
    work = Path(args.work)
    src = Path(args.source)
    if job in ("peer_lora", "peer_ti"):
        import runpy

        import transformers.utils
        from transformers import CLIPImageProcessor  # noqa: F401  (resolved without torchvision first)

        transformers.utils.is_torchvision_available()  # cached False: the stand-in serves only the script
        sys.path.insert(0, args.stub)
        script = args.lora_script if job == "peer_lora" else args.ti_script
        common = ["--pretrained_model_name_or_path", args.model_dir, "--output_dir", str(work / job),
                  "--resolution", str(args.resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
                  "--checkpointing_steps", "1000000", "--seed", "0", "--dataloader_num_workers", "0"]
        if job == "peer_lora":
            argv = common + ["--instance_data_dir", str(src / "images"), "--instance_prompt", "a photo of sks person",
                             "--learning_rate", "1e-4"]
        else:
            argv = common + ["--train_data_dir", str(src / "images"), "--learnable_property", "object",
                             "--placeholder_token", "<v1>", "--initializer_token", "person", "--learning_rate",
                             "5e-4", "--save_steps", "1000000"]
        sys.argv = [script] + argv
        runpy.run_path(script, run_name="__main__")
    elif job in ("ours_lora", "ours_ti"):
        from magicstudio.methods.magicapture import make_config, run_training
        from magicstudio.methods.magicapture.train import MagiCapture

        MagiCapture.sample = lambda *a, **k: None  # the peers train without validation images too
        lora = job == "ours_lora"
        cfg = make_config("paper", model=args.model_dir, resolution=args.resolution, grad_accum=1,
                          ti_steps=0 if lora else steps, lora_steps=steps if lora else 0, use_ar=False,
                          use_composed=False, use_id=False, checkpoint_every=0)
        out = work / job
        shutil.rmtree(out, ignore_errors=True)
        run_training(src, args.reference, out, cfg, progress=False)
    elif job == "peer_infer":
        from diffusers import DDIMScheduler

        pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        run = work / "ours_lora"
        pipe.load_lora_weights(str(run))
        for tok in ("v1", "v2"):
            pipe.load_textual_inversion(str(run / "embeddings" / f"{tok}.safetensors"), token=f"<{tok}>")
        pipe.set_progress_bar_config(disable=True)
        pipe(PROMPT, num_inference_steps=20, guidance_scale=7.5, height=args.resolution, width=args.resolution,
             generator=torch.Generator().manual_seed(0))
    elif job == "ours_infer":
        from magicstudio.training.generate import generate

        out = work / "generated"
        shutil.rmtree(out, ignore_errors=True)
        generate(work / "ours_lora", out, PROMPT, num_images=1, steps=20, guidance=7.5, scheduler="ddim")
    gaps = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])] if args.warmup else []
    result = {"step_s": gaps, "infer_s": infer, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "threads": torch.get_num_threads()}
    Path(args.json).write_text(json.dumps(result))


def run_child(job: str, args, extra: dict) -> dict:
    work = cache_root() / "work"
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{job}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--json", str(out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--resolution", str(args.resolution), "--work", str(work)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    t0 = time.perf_counter()
    with open(work / f"{job}.log", "w") as logf:
        rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc or not out.is_file():
        raise SystemExit(f"peer.py: job {job} failed (exit {rc}); see {work / (job + '.log')}")
    res = json.loads(out.read_text())
    log(f"{job}: {time.perf_counter() - t0:.0f} s wall, steps {[round(x, 2) for x in res['step_s']]}, "
        f"inference {[round(x, 1) for x in res['infer_s']]}, peak RSS {res['peak_rss_gb']:.2f} GB")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per training job (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out before timing (default 1)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="alternation rounds (default 2)")
    p.add_argument("--model", default="sd15-random", choices=["sd15-random", "tiny"],
                   help="sd15-random (the real cost) or tiny (a quick check that everything runs)")
    p.add_argument("--diffusers-src", help="a diffusers checkout or git directory with the tag " + TAG)
    p.add_argument("--no-inference", action="store_true", help="training steps and memory only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("json", "work", "model-dir", "source", "reference", "lora-script", "ti-script", "stub"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("peer.py: --steps and --warmup must be at least 1")
    if args.child:
        child(args.child, args)
        return 0

    scripts = peer_scripts(args.diffusers_src)
    src, ref = data_dirs()
    extra = dict(model_dir=model_dir(args.model), source=src, reference=ref, stub=torchvision_stub(),
                 lora_script=scripts["examples/dreambooth/train_dreambooth_lora.py"],
                 ti_script=scripts["examples/textual_inversion/textual_inversion.py"])
    jobs = [("lora_step", "peer_lora", "ours_lora"), ("ti_step", "peer_ti", "ours_ti")]
    if not args.no_inference:
        jobs.append(("inference", "peer_infer", "ours_infer"))
    got: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for _, peer, ours in jobs:  # alternate, and swap who goes first each round
            for job in ((peer, ours) if r % 2 == 0 else (ours, peer)):
                if job.endswith("infer") and not (cache_root() / "work" / "ours_lora" / "DONE").is_file():
                    run_child("ours_lora", args, extra)
                got.setdefault(job, []).append(run_child(job, args, extra))

    def med(job: str, key: str) -> float:
        return statistics.median(x for res in got[job] for x in res[key])

    rows, ratios = [], {}
    for name, peer, ours in jobs:
        key = "infer_s" if name == "inference" else "step_s"
        a, b = med(ours, key), med(peer, key)
        rows.append((name, a, b))
        ratios[name] = a / b
    rss_ours = max(r["peak_rss_gb"] for r in got["ours_lora"])
    rss_peer = max(r["peak_rss_gb"] for r in got["peer_lora"])
    ratios["peak_rss"] = rss_ours / rss_peer
    import torch

    print(f"\nmagicstudio vs diffusers {TAG} examples: {args.model} at {args.resolution} px, batch 1, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} alternating rounds, "
          f"{got['ours_lora'][0]['threads']} threads, {os.cpu_count()} CPUs (medians; ratio = ours / peer)")
    print(f"{'comparison':<12} {'ours':>10} {'peer':>10} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:<12} {a:>9.2f}s {b:>9.2f}s {a / b:>7.3f}")
    print(f"{'peak_rss':<12} {rss_ours:>8.2f}GB {rss_peer:>8.2f}GB {ratios['peak_rss']:>7.3f}")
    del torch
    for name in ("lora_step", "ti_step", "inference", "peak_rss"):
        if name in ratios:
            print(f"peer-ratio {name} {ratios[name]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
