"""``load_base``: one entry point for every way a user names a Stable Diffusion 1.x/2.x model.

- ``"tiny"``: the built-in random-weight model (tests).
- ``"toyworld"``: the small LDM trained on the toy world (``magicstudio toyworld pretrain``; the demo's model).
- a local diffusers folder (has ``model_index.json``), e.g. one written by ``magicstudio tiny-model``.
- a single-file checkpoint (``.safetensors``, A1111/ComfyUI style; ``.ckpt`` only if it holds plain tensors).
- a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (downloaded, or read from the local cache).

Failures are one-line ``UserError`` messages that say what to do, never a traceback from deep inside a loader.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch

from ..errors import UserError
from ..hub import local_only
from ..io import read_pickle
from .components import Components
from .tiny import build_tiny

log = logging.getLogger(__name__)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def _offline() -> bool:
    """Cache only: the hub is off (HF_HUB_OFFLINE) or unreachable (``hub.local_only``: seconds, not minutes)."""
    return local_only()


def _resolution(unet, vae) -> int:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(unet.config.sample_size) * scale


def _family(text_encoder) -> str:
    return "sd2" if getattr(text_encoder.config, "hidden_size", 768) == 1024 else "sd1"


def _from_folder_or_hub(ref: str, dtype, local_only: bool) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=local_only)
    tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(ref, subfolder="vae", torch_dtype=dtype, **kw)
    unet = UNet2DConditionModel.from_pretrained(ref, subfolder="unet", torch_dtype=dtype, **kw)
    scheduler = DDPMScheduler.from_pretrained(ref, subfolder="scheduler", **kw)
    return Components(tokenizer, text_encoder, vae, unet, scheduler, source=ref,
                      resolution=_resolution(unet, vae), family=_family(text_encoder))


def _from_single_file(path: Path, dtype, config: str | None) -> Components:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    kwargs = dict(torch_dtype=dtype, local_files_only=_offline() or config is not None)
    if config:
        kwargs["config"] = config
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        hint = "" if config or not _offline() else (
            "; offline, a single-file checkpoint needs its model family's diffusers config in the Hugging Face cache: "
            "run once online, or pass a local diffusers folder (with model_index.json) instead"
        )
        raise UserError(f"could not load single-file checkpoint {path}: {msg}{hint}") from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler, source=str(path),
                      resolution=_resolution(pipe.unet, pipe.vae), family=_family(pipe.text_encoder))


def load_base(model: str = "tiny", dtype: torch.dtype | None = None, seed: int = 0, config: str | None = None) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the DDPM noise scheduler of a SD 1.x/2.x model.

    ``model`` is ``"tiny"``, a local diffusers folder, a single-file checkpoint, or a hub id. ``config`` is an
    optional local diffusers folder giving the architecture of a single-file checkpoint when offline.
    """
    if not model:
        raise UserError("no base model given (use 'tiny', a hub id, a diffusers folder or a .safetensors file)")
    if model == "tiny":
        comps = build_tiny(seed)
        return comps.to(dtype=dtype) if dtype is not None else comps
    if model == "toyworld":
        from .toyworld import load_toyworld

        return load_toyworld(dtype=dtype)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        try:
            return _from_folder_or_hub(str(path), dtype, local_only=True)
        except pickle.UnpicklingError as exc:  # a pickled component torch's weights-only loader refused
            raise _folder_pickle_error(path, exc) from None
        except (OSError, ValueError, EnvironmentError) as exc:
            raise UserError(f"{path} is not a complete Stable Diffusion folder: {str(exc).splitlines()[0]}") from None
    if path.suffix in SINGLE_FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path} is not a model checkpoint (expected .safetensors or .ckpt)")
        _check_checkpoint(path)
        return _from_single_file(path, dtype, config)
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"model {model!r} not found: not a folder, not a file, and not a hub id like 'org/name'")
    try:
        return _from_folder_or_hub(model, dtype, local_only=_offline())
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"could not load {model!r} from the hub or the local cache ({first}); without internet, "
            f"pass a local diffusers folder or a .safetensors checkpoint, or use --model tiny"
        ) from None


def _folder_pickle_error(folder: Path, exc: BaseException) -> UserError:
    """The one-line reason a diffusers folder's pickled weights were refused, naming the file (read again here
    with ``read_pickle``, weights-only: nothing in it runs). Never torch's advice to pass ``weights_only=False``."""
    for sub in ("text_encoder", "unet", "vae"):
        for f in sorted((folder / sub).glob("*")):
            if f.suffix in (".bin", ".pt", ".pth", ".ckpt") and f.is_file():
                try:
                    read_pickle(f, mmap=True)
                except UserError as refused:
                    return refused
    return UserError(f"{folder}: a pickled weights file was refused as unsafe: it needs code to unpickle")


def _check_checkpoint(path: Path) -> None:
    """Reject files that are not SD checkpoints (damaged, unsafe pickles, LoRAs, embeddings) before diffusers."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:
            raise UserError(
                f"{path} is not a readable safetensors file: it is damaged, truncated or not a checkpoint at all "
                f"({exc.__class__.__name__})"
            ) from None
    else:
        state = read_pickle(path, mmap=True)  # UserError when damaged or when unpickling it could run code
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        keys = [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    markers = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
    if not any(k.startswith(markers) for k in keys):
        raise UserError(
            f"{path} holds no Stable Diffusion UNet/VAE/text encoder weights: it looks like a LoRA or an embedding, "
            f"not a full model checkpoint (give a whole SD 1.x/2.x checkpoint, a diffusers folder or a hub id)"
        )
