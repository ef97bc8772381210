"""Speed and memory of MagicFace sampling (issue #6, "Speed"), relative to plain sampling.

    python benchmarks/magicface_speed.py [--model tiny|sd15-random|<any --model>] [--size N] [--steps S]
                                         [--rounds R] [--refs 1,2,3] [--no-memory]

Time: one process; each round generates one image with every variant, in an order rotated every round (the
machine is noisy). ``plain`` is diffusers' StableDiffusionPipeline (DDIM, CFG) on the same modules, steps and
size; ``refs=k`` is ``MagicFaceSampler.sample`` with k references (RSA for alpha = 0.4 of the steps, then RBA with
the attention segmentation; references and prompts encoded once beforehand, as for a batch of images). Reported:
median seconds per image, and the median over rounds of the per-round ratio to plain; goal <= 1 + 0.6 x refs.

Memory: a fresh subprocess per variant (the allocator keeps what an earlier variant freed), with glibc told to
hand every block above 128 KiB back to the OS when freed, so RSS follows the live tensors: the peak RSS while one
image is made (after a warm-up image), above the RSS just before it, and that peak itself.

``--model sd15-random`` builds SD 1.5's architecture (UNet, VAE, CLIP-L text encoder) with random weights: the
real model's cost without its weights (default size 256). Any other value goes to ``load_base``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
WORDS = ("woman", "shirt", "hat")
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0"}
PROMPT = "a photo of a woman wearing a shirt and a hat"


def load(model: str):
    if model != "sd15-random":
        from magicstudio.models import load_base

        return load_base(model)
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from magicstudio.models.components import Components
    from magicstudio.models.tiny import SCHEDULER_CONFIG
    from magicstudio.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768, eos_token_id=49407))
    for m in (unet, vae, text):
        m.eval()
    return Components(load_clip_tokenizer(), text, vae, unet, DDPMScheduler.from_config(SCHEDULER_CONFIG),
                      source="sd15-random", resolution=512)


def references(n: int, size: int):
    import numpy as np
    from PIL import Image

    from magicstudio.methods.magicface import Concept, prepare_references

    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    concepts = [Concept(w, Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), mask)
                for w in WORDS[:n]]
    return prepare_references(concepts, size)


def make_variants(comps, size: int, steps: int, refs: list[int]):
    """name -> callable(seed) generating one image."""
    import torch

    from magicstudio.methods.magicface import MagicFaceSampler

    pipe = comps.pipeline(comps.inference_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    variants = {"plain": lambda seed: pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size,
                                           width=size, generator=torch.Generator().manual_seed(seed)).images[0]}

    def magicface(sampler):
        def run(seed):
            with sampler:
                return sampler.sample(seed)[0]
        return run

    for k in refs:
        variants[f"refs={k}"] = magicface(MagicFaceSampler(comps, PROMPT, references(k, size), steps=steps))
    return variants


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args) -> None:
    """One variant, one image, in this fresh process: prints JSON with the peak RSS above the pre-run RSS."""
    comps = load(args.model)
    size = args.size or comps.resolution
    run = make_variants(comps, size, args.steps, [int(args.memory_child[5:])] if args.memory_child != "plain" else [])
    run = run[args.memory_child]
    run(0)  # warm-up: lazy imports and kernel caches are not the method's memory
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=watch)
    thread.start()
    run(1)
    done.set()
    thread.join()
    top = max(peak[0], rss_mb())
    print(json.dumps({"delta_mb": top - base, "peak_mb": top}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--size", type=int, default=None, help="image side (default: tiny 128, sd15-random 256, else the model's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--refs", default="1,2,3")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    if args.size is None and args.model == "sd15-random":
        args.size = 256
    if args.memory_child:
        return memory_child(args)
    refs = [int(k) for k in args.refs.split(",")]
    comps = load(args.model)
    size = args.size or comps.resolution
    variants = make_variants(comps, size, args.steps, refs)
    names = list(variants)
    print(f"model {args.model}, {size} px, {args.steps} DDIM steps, {args.rounds} rounds", file=sys.stderr)
    for name in names:  # warm-up
        variants[name](0)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name](r + 1)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), file=sys.stderr)
    memory = {}
    if not args.no_memory:
        for name in names:
            cmd = [sys.executable, __file__, "--model", args.model, "--size", str(size), "--steps", str(args.steps),
                   "--memory-child", name]
            env = {**os.environ, **CHILD_MALLOC}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
            memory[name] = json.loads(out)
    print(f"\nMagicFace vs plain sampling: model {args.model}, {size} px, {args.steps} steps, CFG 7.5, "
          f"median of {args.rounds} alternating rounds")
    print(f"{'variant':<8} {'s/image':>8} {'ratio':>6} {'goal':>6}  {'peak +MB':>9} {'ratio':>6} {'peak MB':>8}")
    plain = statistics.median(times["plain"])
    for name in names:
        ratio = statistics.median(t / p for t, p in zip(times[name], times["plain"]))
        k = 0 if name == "plain" else int(name[5:])
        goal = "" if not k else f"{1 + 0.6 * k:.1f}" + (" ok" if ratio <= 1 + 0.6 * k else " NO")
        mem = memory.get(name)
        mem_txt = (f"{mem['delta_mb']:9.0f} {mem['delta_mb'] / max(memory['plain']['delta_mb'], 1e-9):6.2f} "
                   f"{mem['peak_mb']:8.0f}") if mem else ""
        print(f"{name:<8} {statistics.median(times[name]):8.2f} {ratio:6.2f} {goal:>6}  {mem_txt}")
    print(f"(plain: {plain:.2f} s/image)")


if __name__ == "__main__":
    main()
