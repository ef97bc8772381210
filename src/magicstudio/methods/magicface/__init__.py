"""MagicFace: training-free multi-concept customisation (Wang et al., arXiv:2408.07433).

No training: each concept (a face, a hairstyle, a shirt ...) is one reference image with a mask, named by a word
of the prompt. Read top to bottom:

1. ``parse_concept`` / ``find_word_positions``: "woman=me.jpg[:mask.png]" and where "woman" sits in the prompt.
2. ``prepare_references``: each image centre-cropped to the generation size; its mask from the user, or made by
   the FaceAnalyzer for face / head / hair / person words, or the whole image (with a warning).
3. ``MagicFaceSampler.sample``: the denoising loop. The reference latents (VAE means) are re-noised
   to the current timestep with fresh noise at every step and denoised in the same batch as the target, under
   their own prompts ("a photo of a <word>"). The replaced self-attention layers (default: up blocks at the two
   highest resolutions) run RSA for the first ``alpha`` of the steps (semantic layout) and RBA for the
   rest (concept features routed by the attention-based segmentation of the previous step). DDIM 50,
   CFG 7.5, w = 3, alpha = 0.4 as in the paper.
4. ``run_magicface``: the whole job, writing PNGs (and with ``save_masks`` the per-step segmentation).

Batch layout: ``[uncond target, cond target, ref_1 .. ref_R]``. The references need no unconditional rows: only
their keys and values in the conditional branch matter (their noise predictions are thrown away, their latents
re-noised from z_0 each step), and the unconditional target uses plain self-attention, so leaving those rows out
changes nothing but the cost.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...attention.capture import AttentionStore, restore_processors
from ...attention.magicface import MagicFaceState, install_magicface, replaced_layers
from ...attention.segmentation import PALETTE, render, segment
from ...errors import UserError
from ...models.tokens import find_word_positions
from ...training.sampling import a1111_parameters, check_image_seeds, image_grid, save_png, unused_stem

log = logging.getLogger(__name__)

#: concept words whose reference mask the FaceAnalyzer makes, and which mask (last word of the concept decides)
REGION_WORDS = {"face": "face", "head": "head", "hair": "hair", "hairstyle": "hair", "haircut": "hair",
                "hairdo": "hair", "body": "person"}
PERSON_WORDS = {"woman", "man", "person", "girl", "boy", "lady", "gentleman", "guy", "child", "kid", "baby",
                "teenager", "actor", "actress", "human"}


@dataclass
class Concept:
    """One concept: the prompt word that names it, its reference image and an optional mask file."""

    word: str
    image: str | os.PathLike | Image.Image
    mask: str | os.PathLike | np.ndarray | None = None


@dataclass
class Reference:
    """A prepared concept: square image at the generation size, its mask (uint8 0/255) and where the mask came from."""

    word: str
    image: Image.Image
    mask: np.ndarray
    mask_source: str


# 1. concepts and prompt words -----------------------------------------------------------------------------------

def parse_concept(spec: str) -> Concept:
    """``word=image`` or ``word=image:mask`` (an image path that itself contains ':' is taken whole if it exists)."""
    word, sep, rest = spec.partition("=")
    word = " ".join(word.split())
    if not sep or not word or not rest:
        raise UserError(f"bad --concept {spec!r}: expected word=image.jpg or word=image.jpg:mask.png")
    if not re.fullmatch(r"[\w][\w '\-]*", word):
        raise UserError(f"bad concept word {word!r}: use the word as it appears in the prompt (letters, digits, - ')")
    if ":" in rest and not Path(rest).exists():
        image, _, mask = rest.rpartition(":")
        if not image or not mask:
            raise UserError(f"bad --concept {spec!r}: expected word=image.jpg:mask.png")
        return Concept(word, image, mask)
    return Concept(word, rest)


# 2. references ------------------------------------------------------------------------------------------------

def mask_kind(word: str, all_words: list[str]) -> str | None:
    """Which automatic mask a word gets: face, head, hair, person, or None (user mask or whole image).

    A person word (woman, man ...) gets the head (face and hair), or only the face when another concept is hair.
    """
    last = word.lower().split()[-1]
    if last in REGION_WORDS:
        return REGION_WORDS[last]
    if last in PERSON_WORDS:
        others = [w for w in all_words if w != word]
        return "face" if any(REGION_WORDS.get(w.lower().split()[-1]) == "hair" for w in others) else "head"
    return None


def _auto_mask(analyzer, image: Image.Image, kind: str, word: str, origin: str) -> np.ndarray:
    a = analyzer.analyze(image)
    masks = {"face": a.face_mask, "head": a.head_mask, "person": a.person_mask,
             "hair": np.where((a.head_mask > 0) & (a.face_mask == 0), 255, 0).astype(np.uint8)}
    mask = masks[kind]
    if not mask.any():
        what = "person" if kind == "person" else "face" if a.face is None else kind
        raise UserError(f"{origin}: no {what} found for concept {word!r}; give a mask: --concept {word}=IMAGE:MASK.png")
    return mask


def _user_mask(mask, size: tuple[int, int], word: str) -> np.ndarray:
    from ...data.masks import binarize, load_mask

    m = binarize(mask) if isinstance(mask, np.ndarray) else load_mask(mask)
    w, h = size
    if m.shape != (h, w):
        if abs(m.shape[1] / m.shape[0] - w / h) > 0.01:
            raise UserError(f"the mask of concept {word!r} is {m.shape[1]}x{m.shape[0]}, its image {w}x{h}")
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST))
    return m


def prepare_references(concepts: list[Concept], size: int, analyzer=None) -> list[Reference]:
    """Load, mask and centre-crop every concept's reference to ``size`` x ``size``.

    ``analyzer``: the ``FaceAnalyzer`` for automatic masks (default: mediapipe's, made when first needed).
    """
    from ...data.images import center_crop, load_image

    words = [c.word for c in concepts]
    made = None
    refs = []
    try:
        for c in concepts:
            origin = "reference image" if isinstance(c.image, Image.Image) else str(c.image)
            image = c.image.convert("RGB") if isinstance(c.image, Image.Image) else load_image(c.image)
            kind = mask_kind(c.word, words)
            if c.mask is not None:
                mask, source = _user_mask(c.mask, image.size, c.word), "user mask"
            elif kind is not None:
                if analyzer is None:
                    from ...data.faces import MediapipeFaceAnalyzer

                    analyzer = made = MediapipeFaceAnalyzer()
                mask, source = _auto_mask(analyzer, image, kind, c.word, origin), f"{kind} mask (automatic)"
            else:
                log.warning("concept %r has no mask: using the whole of %s (add one with --concept %s=IMAGE:MASK.png)",
                            c.word, origin, c.word)
                mask, source = np.full((image.height, image.width), 255, np.uint8), "whole image"
            crop = center_crop(image.width, image.height, size)
            mask = crop.apply_mask(mask)
            if not mask.any():
                raise UserError(f"the mask of concept {c.word!r} is empty after centre-cropping {origin} to a square")
            refs.append(Reference(c.word, crop.apply(image), mask, source))
    finally:
        if made is not None:
            made.close()
    return refs


def reference_preview(refs: list[Reference]) -> Image.Image:
    """The references side by side, each mask tinted in its concept's colour (the legend of the mask pictures)."""
    from ...data.masks import overlay

    return image_grid([overlay(r.image, r.mask, PALETTE[i % len(PALETTE)]) for i, r in enumerate(refs)], cols=len(refs))


# 3. sampling --------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(comps, texts: list[str]) -> torch.Tensor:
    tok = comps.tokenizer(texts, padding="max_length", max_length=comps.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    device = comps.text_encoder.device
    return comps.text_encoder(tok.input_ids.to(device))[0]


@torch.no_grad()
def encode_images(comps, images: list[Image.Image]) -> torch.Tensor:
    """Reference latents: the VAE posterior means, scaled (the references' z_0)."""
    vae = comps.vae
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    x = x.to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


class MagicFaceSampler:
    """One prompt with its references on one model; ``sample(seed)`` makes an image. Use as a context manager
    (installs the MagicFace attention processors, restores the previous ones on exit)."""

    def __init__(self, comps, prompt: str, references: list[Reference], *, negative: str = "", alpha: float = 0.4,
                 weight: float = 3.0, steps: int = 50, guidance: float = 7.5, layers: str | list[str] = "up:1+2",
                 ref_prompt: str = "a photo of a {word}", other_scale: float = 0.9):
        if not references:
            raise UserError("MagicFace needs at least one --concept")
        check_options(alpha=alpha, weight=weight, steps=steps, guidance=guidance)
        self.comps, self.prompt, self.refs = comps, prompt, references
        self.alpha, self.steps, self.guidance, self.other_scale = alpha, steps, guidance, other_scale
        self.size = references[0].image.width
        self.latent = self.size // comps.vae_scale
        self.tokens = find_word_positions(comps.tokenizer, prompt, [r.word for r in references])
        texts = ([negative] if guidance > 1 else []) + [prompt] + [ref_prompt.format(word=r.word) for r in references]
        self.embeddings = encode_prompts(comps, texts)
        self.ref_latents = encode_images(comps, [r.image for r in references])
        masks = torch.from_numpy(np.stack([r.mask for r in references]) > 0).float()
        target = 1 if guidance > 1 else 0
        self.state = MagicFaceState(masks, [weight] * len(references), target=target, first_ref=target + 1)
        self.store = AttentionStore(keep_full=True, keep_self=True, full_max_tokens=max(1, self.latent // 2) ** 2,
                                    active=False)
        self.layers = replaced_layers(comps.unet, layers)

    def __enter__(self) -> "MagicFaceSampler":
        self._previous = install_magicface(self.comps.unet, self.state, self.store, self.layers)
        return self

    def __exit__(self, *exc) -> None:
        restore_processors(self.comps.unet, self._previous)

    @torch.no_grad()
    def sample(self, seed: int, keep_masks: bool = False, progress: bool = False):
        """Generate one image from ``seed``; returns it and the segmentations ((S, S) long tensors, concept index or
        -1): of every step with ``keep_masks``, else of the steps whose maps RBA used. ``self.schedule`` then holds,
        per step, its timestep, the mode set and what the replaced layers ran (``MagicFaceState.ran``)."""
        unet, vae, st, store = self.comps.unet, self.comps.vae, self.state, self.store
        device, dtype = unet.device, unet.dtype
        sched = self.comps.inference_scheduler("ddim")
        sched.set_timesteps(self.steps)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, 4, self.latent, self.latent), generator=gen).to(device, dtype) * sched.init_noise_sigma
        ref_z0 = self.ref_latents.to(device, dtype)
        n_rsa = round(self.alpha * self.steps)
        st.assignment, segmentations = None, []
        self.schedule: list[dict] = []
        timesteps = sched.timesteps
        if progress:
            from tqdm.auto import tqdm

            timesteps = tqdm(timesteps, desc="MagicFace", leave=False)
        for i, t in enumerate(timesteps):
            noise = torch.randn(ref_z0.shape, generator=gen).to(device, dtype)
            refs_t = sched.add_noise(ref_z0, noise, t.reshape(1))  # fresh noise every step
            target = torch.cat([latents] * (st.target + 1))
            x = sched.scale_model_input(torch.cat([target, refs_t]), t)
            st.mode = "rsa" if i < n_rsa else "rba"
            store.reset()
            store.active = keep_masks or n_rsa - 1 <= i < self.steps - 1  # maps for the next step's RBA
            st.ran = []
            eps = unet(x, t, encoder_hidden_states=self.embeddings.to(device, dtype)).sample
            self.schedule.append({"step": i, "t": int(t), "mode": st.mode, "ran": list(st.ran)})
            eps_t = eps[st.target:st.target + 1]
            if st.target:
                eps_t = eps[:1] + self.guidance * (eps_t - eps[:1])
            latents = sched.step(eps_t, t, latents).prev_sample
            if store.active:
                st.assignment = segment(store, self.tokens, max(1, self.latent // 2), self.other_scale)
                segmentations.append(st.assignment.cpu())
        store.active, st.mode = False, "off"
        image = vae.decode(latents / vae.config.scaling_factor).sample[0].float().clamp(-1, 1)
        pixels = ((image.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        return Image.fromarray(pixels), segmentations


# 4. the whole job ---------------------------------------------------------------------------------------------

def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def check_options(*, alpha: float = 0.4, weight: float = 3.0, steps: int = 50, guidance: float = 7.5,
                  num_images: int = 1, seed: int = 0) -> None:
    """One-line ``UserError`` for an option out of range (checked before anything slow)."""
    if not _finite(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"--alpha must be a number in [0, 1] (got {alpha})")
    if not _finite(weight):
        raise UserError(f"--weight must be a finite number (got {weight})")
    if not _finite(guidance):
        raise UserError(f"--guidance must be a finite number (got {guidance})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps})")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"--num-images must be at least 1 (got {num_images})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"--seed must be a whole number (got {seed})")
    check_image_seeds(seed, num_images)


def run_magicface(concepts: list[Concept | str], prompt: str, out_dir: str | os.PathLike, model: str = "tiny", *,
                  alpha: float = 0.4, weight: float = 3.0, num_images: int = 1, seed: int = 0, steps: int = 50,
                  guidance: float = 7.5, negative: str = "", size: int | None = None,
                  layers: str | list[str] = "up:1+2", ref_prompt: str = "a photo of a {word}",
                  save_masks: bool = False, progress: bool = False, comps=None) -> list[Path]:
    """Generate ``num_images`` MagicFace images (seeds ``seed``, ``seed + 1`` ...) into ``out_dir``.

    ``concepts``: ``Concept`` objects or ``"word=image[:mask]"`` strings. ``model``: "tiny", a hub id, a diffusers
    folder or a single-file checkpoint (SD 1.x / 2.x); ``comps`` skips loading. ``save_masks`` also writes
    ``references.png`` (each reference with its mask), ``<image>-masks.png`` (segmentation of every step, left to
    right) and ``masks/<image>/stepNNN.png``. Returns the image paths.
    """
    from ...models.base import load_base

    concepts = [parse_concept(c) if isinstance(c, str) else c for c in concepts]
    words = [c.word for c in concepts]
    if len(set(words)) != len(words):
        raise UserError(f"each concept needs its own word (got {', '.join(words)})")
    check_options(alpha=alpha, weight=weight, steps=steps, guidance=guidance, num_images=num_images, seed=seed)
    comps = comps or load_base(model)
    size = size or comps.resolution
    if size % 8 or size < 64:
        raise UserError(f"--size must be a multiple of 8, at least 64 (got {size})")
    find_word_positions(comps.tokenizer, prompt, words)  # fail on a missing word before the slow parts
    replaced_layers(comps.unet, layers)  # a bad --layers (UserError) fails before anything is written
    refs = prepare_references(concepts, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if save_masks:  # one free name per invocation: references[-N].png; masks/ holds one folder per image stem
        reference_preview(refs).save(out / f"{unused_stem(out, 'references', ('{}.png', '{}'))}.png")
    extra = {"MagicFace": f"alpha {alpha}, w {weight}, concepts {'/'.join(words)}"}
    paths = []
    with MagicFaceSampler(comps, prompt, refs, negative=negative, alpha=alpha, weight=weight, steps=steps,
                          guidance=guidance, layers=layers, ref_prompt=ref_prompt) as sampler:
        for k in range(num_images):
            s = seed + k
            image, segs = sampler.sample(s, keep_masks=save_masks, progress=progress)
            params = a1111_parameters(prompt, negative, steps, "ddim", guidance, s, (size, size), comps.source, extra)
            # never overwrite earlier images or their companions
            stem = unused_stem(out, f"{k:03d}-seed{s}", ("{}.png", "{}-masks.png", "masks/{}"))
            path = save_png(image, out / f"{stem}.png", params)
            paths.append(path)
            if save_masks:
                pictures = [render(a, size) for a in segs]
                (out / "masks" / path.stem).mkdir(parents=True, exist_ok=True)
                for step, pic in enumerate(pictures):
                    pic.save(out / "masks" / path.stem / f"step{step:03d}.png")
                image_grid([image] + pictures, cols=len(pictures) + 1).save(out / f"{path.stem}-masks.png")
    return paths
