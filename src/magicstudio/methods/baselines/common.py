"""What the three baselines share: settings, class images for prior preservation, the training step, the run.

Every baseline learns the identity ``<v1>`` from the source images ("a photo of a <v1> person") and the style
``<v2>`` from the reference images ("a painting of a person in the style of <v2>"), one source and one reference
image per step (the paper's batch of two), with the plain (unmasked) denoising loss the original methods use.
With prior preservation each instance image is paired with one class image made by the base model itself
(``a photo of a person``) and the loss is ``L_instance + prior_weight * L_prior`` (DreamBooth's Eq. 2).
They run in MagiCapture's training loop (``methods/training.py``), draw data with the same ``ConceptSampler``
and write the same run folder, so ``magicapture.generate.generate`` samples any of them with the composed prompt.

A method module subclasses ``Baseline`` with ``phases()``, ``trainable_state()``, ``load_trainable_state()`` and
``export(run)`` (the weights it leaves in the run folder), and gives its ``paper`` / ``smoke`` presets.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserError
from ...io import write_json
from ..concepts import ConceptSet
from ..magicapture import config as MC
from ..personalize import ConceptSampler, add_concept_tokens, encode_prompt
from ..runs import RunDir
from ..training import StepOutput

log = logging.getLogger(__name__)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class BaselineConfig:
    method: str = ""
    preset: str = "paper"
    model: str = SD15
    resolution: int | None = None  # None: the base model's native size
    seed: int = 0
    mode: str = "portrait"  # the run-folder contract (generate's default prompt) reads it
    # tokens: <v1> identity (source images), <v2> style (reference images)
    v1: str = "<v1>"
    v2: str = "<v2>"
    v1_init: str = "person"
    v2_init: str = "style"
    # prompts: "fixed" = the first MagiCapture template of each kind, "varied" = a random one per example
    templates: str = "fixed"
    # optimisation
    steps: int = 1000
    lr: float = 1e-5
    per_concept: int = 1  # images of each concept per step: batch = 2 * per_concept (+ as many class images)
    grad_accum: int = 1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    lr_schedule: str = "constant"
    t_max: int = 1000
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    deterministic: bool = True
    hflip: bool = True
    color_jitter: float = 0.0
    # prior preservation (DreamBooth Eq. 2): class images from the base model itself
    prior: bool = False
    prior_weight: float = 1.0
    class_prompt: str = "a photo of a person"
    num_class_images: int = 200
    class_steps: int = 50
    class_guidance: float = 7.5
    class_seed: int = 0
    class_batch: int = 4
    class_dir: str | None = None  # a folder to cache class images in (shareable between runs); None: RUN/class_images
    # Custom Diffusion: rank of the LoRA the K/V deltas are exported as (None: full rank, exact)
    export_rank: int | None = None
    # bookkeeping
    checkpoint_every: int = 250
    keep_checkpoints: int = 1
    sample_every: int = 0
    sample_steps: int = 25
    log_every: int = 1

    def tokens(self) -> list[str]:
        return [self.v1, self.v2]

    @property
    def total_steps(self) -> int:
        return self.steps


def make_baseline_config(method: str, presets: dict[str, dict], preset: str = "paper", **overrides) -> BaselineConfig:
    """``presets[preset]`` over the defaults, then ``overrides`` (None values ignored); validated."""
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r} for {method}; choose one of {', '.join(presets)}")
    known = {f.name for f in fields(BaselineConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise UserError(f"unknown {method} setting(s): {', '.join(sorted(unknown))}")
    cfg = replace(BaselineConfig(), method=method, preset=preset, **presets[preset])
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.steps < 1 or cfg.per_concept < 1 or cfg.grad_accum < 1:
        raise UserError("steps, per_concept and grad_accum must be at least 1")
    if cfg.templates not in ("fixed", "varied"):
        raise UserError("templates must be 'fixed' or 'varied'")
    if cfg.v1 == cfg.v2:
        raise UserError("the identity and style tokens must differ")
    if cfg.prior and cfg.num_class_images < 1:
        raise UserError("prior preservation needs num_class_images >= 1")
    if not 0 < cfg.t_max <= 1000:
        raise UserError("t_max must be in (0, 1000]")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Class images (prior preservation), generated once by the base model and cached
# ---------------------------------------------------------------------------------------------------------------


def class_image_folder(cfg: BaselineConfig, root: Path) -> Path:
    """``root/<prompt-slug>-<hash>``: one folder per (model, prompt, size, sampling settings), so a shared
    ``class_dir`` never mixes images made differently."""
    key = {"model": cfg.model, "prompt": cfg.class_prompt, "size": cfg.resolution, "steps": cfg.class_steps,
           "guidance": cfg.class_guidance, "seed": cfg.class_seed}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() else "-" for c in cfg.class_prompt.lower()).strip("-")[:40]
    return root / f"{slug}-{digest}"


@torch.no_grad()
def ensure_class_images(comps, cfg: BaselineConfig, folder: Path, progress: bool = False) -> list[Path]:
    """Make the missing ones of ``num_class_images`` class images in ``folder`` (image ``i`` from seed
    ``class_seed + i``, so a partial folder is completed with exactly the images it would have had)."""
    from ..sampling import save_png

    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "class_images.json"
    if not meta.is_file():  # atomic: runs in parallel may share the folder
        write_json(meta, {"model": cfg.model, "prompt": cfg.class_prompt, "size": cfg.resolution,
                          "steps": cfg.class_steps, "guidance": cfg.class_guidance, "seed": cfg.class_seed})
    paths = [folder / f"{i:04d}.png" for i in range(cfg.num_class_images)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        log.info("generating %d class image(s) for %r into %s", len(missing), cfg.class_prompt, folder)
        pipe = comps.pipeline()
        pipe.set_progress_bar_config(disable=True)
        for start in range(0, len(missing), cfg.class_batch):
            chunk = missing[start:start + cfg.class_batch]
            gens = [torch.Generator().manual_seed(cfg.class_seed + i) for i in chunk]
            images = pipe([cfg.class_prompt] * len(chunk), num_inference_steps=cfg.class_steps,
                          guidance_scale=cfg.class_guidance, height=cfg.resolution, width=cfg.resolution,
                          generator=gens).images
            for i, image in zip(chunk, images):
                save_png(image, paths[i], f"{cfg.class_prompt}\nSteps: {cfg.class_steps}, Seed: {cfg.class_seed + i}")
            if progress:
                print(f"class images: {min(start + len(chunk), len(missing))}/{len(missing)}", file=sys.stderr, flush=True)
    return paths


def images_as_concept(paths: list[Path], resolution: int) -> ConceptSet:
    """Plain images as a ``ConceptSet`` without faces (zero masks, NaN landmarks and boxes)."""
    from PIL import Image

    imgs = []
    for p in paths:
        im = Image.open(p).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    n = len(imgs)
    return ConceptSet(torch.stack(imgs), torch.zeros(n, 1, resolution, resolution), torch.full((n, 5, 2), float("nan")),
                      torch.full((n, 4), float("nan")), [p.stem for p in paths])


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


class Baseline(ABC):
    """The shared part of DreamBooth, Textual Inversion and Custom Diffusion (see the module docstring)."""

    #: extra keys for config.yaml (DreamBooth: ``{"model_dir": "model"}``)
    run_config: dict = {}
    #: whether the placeholder rows are wrapped in a ``PlaceholderEmbedding`` (TI, Custom Diffusion) or live in
    #: the embedding table that trains with the whole text encoder (DreamBooth)
    wrap_tokens: bool = True

    def __init__(self, cfg: BaselineConfig, comps, source: ConceptSet, reference: ConceptSet,
                 class_set: ConceptSet | None = None, device: torch.device | str = "cpu"):
        self.cfg, self.comps, self.device = cfg, comps, torch.device(device)
        if cfg.prior and class_set is None:
            raise UserError(f"{cfg.method}: prior preservation is on but no class images were given")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.token_ids, self.embedding = add_concept_tokens(comps, cfg, self.device, trainable=self.wrap_tokens)
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        concepts = {"source": source, "reference": reference}
        if cfg.prior:
            concepts["class"] = class_set
        self.data = ConceptSampler(comps, concepts, self.generator, self.device, cfg.hflip, cfg.color_jitter,
                                   cfg.cache_latents)

    # -- prompts
    def prompt(self, concept: str) -> str:
        cfg = self.cfg
        if concept == "class":
            return cfg.class_prompt
        templates = MC.SOURCE_TEMPLATES if concept == "source" else MC.REFERENCE_TEMPLATES
        k = 0 if cfg.templates == "fixed" else int(torch.randint(len(templates), (1,), generator=self.generator))
        return templates[k].format(v1=cfg.v1, v2=cfg.v2)

    def composed_prompt(self) -> str:
        return MC.COMPOSED_TEMPLATES[0].format(v1=self.cfg.v1, v2=self.cfg.v2)

    # -- one micro-step: one source + one reference image (+ one class image each), one UNet pass
    def micro_step(self, phase: str, step: int) -> StepOutput:
        cfg = self.cfg
        kinds = ["source"] * cfg.per_concept + ["reference"] * cfg.per_concept
        n_inst = len(kinds)
        if cfg.prior:
            kinds += ["class"] * n_inst
        latents, prompts = [], []
        for kind in kinds:
            z, *_ = self.data.draw(kind)
            latents.append(z)
            prompts.append(self.prompt(kind))
        z0 = torch.cat(latents)
        noise = torch.randn(z0.shape, generator=self.generator).to(z0)
        t = torch.randint(0, cfg.t_max, (z0.shape[0],), generator=self.generator).to(self.device)
        z_t = self.comps.scheduler.add_noise(z0, noise, t.cpu()).to(z0)
        emb, _ = encode_prompt(self.comps, prompts, self.token_ids, self.device)
        pred = self.comps.unet(z_t, t, emb).sample
        target = noise if self.comps.prediction_type == "epsilon" else self.comps.scheduler.get_velocity(z0, noise, t.cpu())
        err = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = err[:n_inst].mean()
        terms = {"loss_instance": loss.item(), "loss_source": err[:cfg.per_concept].mean().item(),
                 "loss_reference": err[cfg.per_concept:n_inst].mean().item()}
        if cfg.prior:
            prior = err[n_inst:].mean()
            loss = loss + cfg.prior_weight * prior
            terms["loss_prior"] = prior.item()
        terms["loss"] = loss.item()
        return StepOutput(loss, terms, "source+reference" + ("+class" if cfg.prior else ""))

    # -- state (subclasses add their weights)
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"embedding.rows": self.embedding.rows.detach().clone()} if self.embedding is not None else {}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.embedding is not None:
            with torch.no_grad():
                self.embedding.rows.copy_(state["embedding.rows"])

    # -- samples and outputs
    @torch.no_grad()
    def sample(self, run: RunDir, step: int, n: int = 2) -> None:
        from ..sampling import image_grid

        pipe = self.comps.pipeline()
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(self.cfg.seed)
        images = pipe(self.composed_prompt(), num_images_per_prompt=n, num_inference_steps=self.cfg.sample_steps,
                      height=self.cfg.resolution, width=self.cfg.resolution, generator=g, guidance_scale=7.5).images
        image_grid(images).save(run.samples / f"step-{step:06d}.png")

    @abstractmethod
    def export(self, run: RunDir) -> None:
        """Write the method's weights into the run folder (each baseline has its own format)."""

    def finalize(self, run: RunDir) -> None:
        self.sample(run, self.cfg.total_steps)
        self.export(run)

    def save_tokens(self, run: RunDir) -> None:
        """``embeddings/<token>.safetensors`` (what ``load_textual_inversion`` reads)."""
        from ...models.tokens import token_vectors
        from ..export import save_embeddings

        save_embeddings(run.path, self.cfg.tokens(), token_vectors(self.comps.text_encoder, self.token_ids))


# ---------------------------------------------------------------------------------------------------------------
# The whole job: prepare, base model, class images, config, train
# ---------------------------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    from ..personalize import process_device

    return process_device()


def run_baseline(method_cls: type[Baseline], source, reference, out, cfg: BaselineConfig, resume: bool = False,
                 progress: bool = True, device: str | None = None) -> RunDir:
    """Train ``method_cls`` into the run folder ``out`` (``resume`` continues an unfinished one)."""
    from ..distributed import open_run_everywhere, process_state
    from ..personalize import open_run
    from ..training import train

    opened = open_run_everywhere(open_run, source, reference, out, cfg, resume, progress)
    if opened is None:
        return RunDir(out)
    run, cfg, comps, source_set, reference_set = opened
    device = device or default_device()
    comps.to(device)
    class_set = None
    if cfg.prior:
        root = Path(cfg.class_dir) if cfg.class_dir else run.path / "class_images"
        with process_state().main_process_first():  # made once, by the main process; the others read them
            paths = ensure_class_images(comps, cfg, class_image_folder(cfg, root), progress)
        class_set = images_as_concept(paths, cfg.resolution)
    if process_state().is_main_process:
        run.write_config(asdict(cfg) | {"source": str(source), "reference": str(reference), "tokens": cfg.tokens()}
                         | method_cls.run_config)
    method = method_cls(cfg, comps, source_set, reference_set, class_set, device)
    train(method, run, grad_accum=cfg.grad_accum, checkpoint_every=cfg.checkpoint_every,
          keep_checkpoints=cfg.keep_checkpoints, sample_every=cfg.sample_every, resume=resume,
          mixed_precision=cfg.mixed_precision, log_every=cfg.log_every, progress=progress,
          deterministic=cfg.deterministic)
    return run
