"""Generation from a run folder of any method with plain diffusers loading (``load_lora_weights`` +
``load_textual_inversion``): what the run folder gives any diffusers user, magicstudio uses itself."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..io import clean_temp_files, folder_lock
from ..models.base import load_base
from .export import LORA_FILE, embedding_name, load_run_into_pipeline
from .runs import RunDir
from .sampling import (AttentionRecorder, a1111_parameters, check_image_seeds, heatmap_overlay, save_png,
                        unused_stem)

log = logging.getLogger(__name__)


def load_run_pipeline(run_dir: str | Path, scheduler: str = "ddim", model: str | None = None, fuse: bool = False):
    """A ``StableDiffusionPipeline`` with the run's LoRA and tokens loaded; returns (pipe, config, tokens).

    ``fuse`` merges the LoRA into the base weights (``fuse_lora`` + ``unload_lora_weights``): the same model, no
    adapter layers in the way while sampling (what ``generate`` uses).

    A run whose config has ``model_dir`` (a full fine-tune, e.g. DreamBooth) is that diffusers folder itself."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    if not run.is_done():
        raise UserError(f"{run.path} has not finished training (no DONE marker); resume it with 'capture train --resume'")
    if cfg.get("model_dir"):  # a full fine-tune (DreamBooth): the run's own diffusers folder, tokens in its tokenizer
        if model:
            raise UserError(f"{run.path} is a full fine-tune (its model is {cfg['model_dir']}/); --model cannot replace it")
        comps = load_base(str(run.path / cfg["model_dir"]))
        pipe = comps.pipeline(scheduler=comps.inference_scheduler(scheduler))
        return pipe, cfg, list(cfg.get("tokens") or [])
    _check_run_files(run, cfg)
    comps = load_base(model or cfg["model"], seed=int(cfg.get("model_seed", 0)))
    pipe = comps.pipeline(scheduler=comps.inference_scheduler(scheduler))
    tokens = load_run_into_pipeline(pipe, run.path)
    if fuse and (run.path / LORA_FILE).is_file():  # the LoRA merged into the weights: plain layers while sampling
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe, cfg, tokens


def _check_run_files(run: RunDir, cfg: dict) -> None:
    """The weight files the run's config says it wrote: without one, diffusers would quietly generate without it."""
    wrote_lora = int(cfg.get("lora_steps") or 0) > 0 or cfg.get("method") == "custom-diffusion"
    expected = [run.path / LORA_FILE] if wrote_lora else []
    expected += [run.embeddings / f"{embedding_name(t)}.safetensors" for t in cfg.get("tokens") or []]
    missing = [str(p) for p in expected if not p.is_file()]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (written when the run finished): restore it, re-export it "
                        f"(delete {run.done_path} and resume the training) or train the run again")


def _load_postprocessor(upscale: int, sr: str, restore_weights: str | None, fidelity: float):
    """Check the post-processing settings and load the face restorer (None without weights) before any image."""
    from ..postprocess import SR_BACKENDS, load_restorer, realesrgan_status

    if sr not in SR_BACKENDS:
        raise UserError(f"unknown super-resolution backend {sr!r}: use auto, {' or '.join(SR_BACKENDS)}")
    if upscale > 1 and sr == "realesrgan":
        ok, why = realesrgan_status()
        if not ok:
            raise UserError(why)
    return load_restorer(restore_weights, "auto", fidelity) if restore_weights else None


def _output_folder(out: Path) -> Path:
    """``out``, created if needed; a file there, an impossible or unwritable place is a one-line UserError."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder for the images")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder {out} ({exc.strerror or type(exc).__name__})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write images to {out} (permission denied)")
    return out


def default_prompt(cfg: dict) -> str:
    from .prompts import composed_prompt

    return composed_prompt(cfg["v1"], cfg["v2"], cfg.get("mode", "portrait"), cfg.get("object_class", "object"))


def generate(run_dir: str | Path, out_dir: str | Path | None = None, prompt: str | None = None, negative: str = "",
             num_images: int = 4, seed: int = 0, steps: int = 50, guidance: float = 7.5, scheduler: str = "ddim",
             save_attention: bool = False, size: int | None = None, model: str | None = None, upscale: int = 0,
             sr: str = "auto", restore_weights: str | None = None, fidelity: float = 0.5,
             attention_maps: list | None = None) -> list[Path]:
    """Generate ``num_images`` PNGs (one seed each: ``seed``, ``seed+1``, ...) into ``out_dir``.

    With ``upscale`` > 1 or ``restore_weights``, each image is also post-processed (the paper's super-resolution
    and face restoration) into ``NNN-seedS-post.png``; the raw image is kept beside it. Earlier images are never
    overwritten: a name already taken gets ``-2``, ``-3``, ... (``NNN-seedS-2.png`` with ``NNN-seedS-2-post.png``).
    With ``save_attention`` each image gets ``NNN-seedS-attention.png`` (the image and one heatmap per token, each
    titled); ``attention_maps``, a list, also receives each image's (S, S, tokens) maps (in ``tokens`` order).
    """
    if num_images < 1 or steps < 1:
        raise UserError("--num-images and --steps must be at least 1")
    check_image_seeds(seed, num_images)
    if sr == "auto":  # the best one installed, said once
        from ..postprocess import best_sr_backend

        sr, note = best_sr_backend(sr)
        if upscale > 1:
            (log.info if sr == "realesrgan" else log.warning)("%s", note)
    restorer = _load_postprocessor(upscale, sr, restore_weights, fidelity)
    post = upscale > 1 or restorer is not None
    from ..allocator import tune

    tune()
    pipe, cfg, tokens = load_run_pipeline(run_dir, scheduler, model, fuse=True)
    prompt = prompt or default_prompt(cfg)
    missing_tokens = [t for t in tokens if t not in prompt]
    if len(missing_tokens) == len(tokens):
        log.warning("the prompt uses none of the run's tokens (%s)", ", ".join(tokens))
    for bad in re.findall(r"<[^<>\s]+>", prompt):
        if bad not in tokens:
            raise UserError(f"the prompt names {bad}, which this run did not learn (it has {', '.join(tokens)})")
    size = size or int(cfg.get("resolution") or 512)
    with folder_lock(run_dir, "run folder"):  # one process generates from (and into) a run at a time
        out = _output_folder(Path(out_dir or Path(run_dir) / "generated"))
        clean_temp_files(out)
        return _generate(pipe, cfg, tokens, run_dir, out, prompt, negative, num_images, seed, steps, guidance,
                         scheduler, save_attention, size, upscale, sr, restorer, fidelity, restore_weights, post,
                         attention_maps)


def _generate(pipe, cfg, tokens, run_dir, out, prompt, negative, num_images, seed, steps, guidance, scheduler,
              save_attention, size, upscale, sr, restorer, fidelity, restore_weights, post,
              attention_maps=None) -> list[Path]:
    token_ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    paths = []
    for i in range(num_images):
        s = seed + i
        pipe.set_progress_bar_config(desc=f"image {i + 1}/{num_images} (seed {s})", leave=False)
        g = torch.Generator().manual_seed(s)
        kwargs = dict(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps,
                      guidance_scale=guidance, height=size, width=size, generator=g)
        if save_attention:
            recorder = AttentionRecorder(pipe, token_ids, "all")
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            recorder.set_prompt_ids(ids, n_uncond=1 if guidance > 1 else 0)
            with recorder:
                image = pipe(**kwargs, callback_on_step_end=recorder.callback).images[0]
        else:
            image = pipe(**kwargs).images[0]
        params = a1111_parameters(prompt, negative, steps, scheduler, guidance, s, (size, size), str(cfg["model"]),
                                  {"Run": Path(run_dir).name})
        stem = unused_stem(out, f"{i:03d}-seed{s}", ("{}.png", "{}-post.png", "{}-attention.png"))  # never overwrite earlier images
        paths.append(save_png(image, out / f"{stem}.png", params))
        if post:
            from ..postprocess import postprocess

            big = postprocess(image, upscale_factor=max(1, upscale), fidelity=fidelity, sr_backend=sr,
                              restorer=restorer)
            how = f"upscale x{max(1, upscale)} ({sr})" + (f", face restoration w={fidelity}" if restore_weights else "")
            save_png(big, out / f"{stem}-post.png", params + f", Postprocess: {how}")
        if save_attention:
            from .figures import arrange, panel

            heat = recorder.maps()[0]
            if attention_maps is not None:
                attention_maps.append(heat.cpu())
            tiles = [panel([image], f"seed {s}", tile=max(96, size))]
            tiles += [panel([heatmap_overlay(image, heat[..., k])], f"{tok} attention", tile=max(96, size))
                      for k, tok in enumerate(tokens)]
            arrange([tiles], margin=4, gap=4).save(out / f"{stem}-attention.png")
    return paths
