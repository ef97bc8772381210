"""What the three baselines share: settings, class images for prior preservation, the training step, the run.

Every baseline learns the identity ``<v1>`` from the source images ("a photo of a <v1> person") and the style
``<v2>`` from the reference images ("a painting of a person in the style of <v2>"), one source and one reference
image per step (the paper's batch of two), with the plain (unmasked) denoising loss the original methods use.
With prior preservation each instance image is paired with one class image made by the base model itself
(``a photo of a person``) and the loss is ``L_instance + prior_weight * L_prior`` (DreamBooth's Eq. 2).
They run in MagiCapture's training loop (``training/loop.py``), draw data with the same ``ConceptSampler``
and write the same run folder, so ``training.generate.generate`` samples any of them with the composed prompt.

A method module subclasses ``Baseline`` with ``phases()``, ``trainable_state()``, ``load_trainable_state()`` and
``export(run)`` (the weights it leaves in the run folder), and gives its ``paper`` / ``smoke`` presets.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError
from ...io import atomic_write, write_json
from ...losses import denoising_loss
from ...training import prompts as P
from ...training.concepts import ConceptSet
from ...training.config import TrainConfig, build_config
from ...training.personalize import ConceptSampler, add_concept_tokens, encode_prompt
from ...training.runs import RunDir
from ...training.loop import StepOutput, Term

log = logging.getLogger(__name__)

@dataclass
class BaselineConfig(TrainConfig):
    """The shared settings (``training.config.TrainConfig``) and what the three baselines add."""

    method: str = ""
    # prompts: "fixed" = the first template of each kind (``training.prompts``), "varied" = a random one per example
    templates: str = "fixed"
    # optimisation
    steps: int = 1000
    lr: float = 1e-5
    per_concept: int = 1  # images of each concept per step: batch = 2 * per_concept (+ as many class images)
    t_max: int = 1000
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

    @property
    def total_steps(self) -> int:
        return self.steps


def make_baseline_config(method: str, presets: dict[str, dict], preset: str = "paper", **overrides) -> BaselineConfig:
    """``presets[preset]`` over the defaults, then ``overrides`` (None values ignored); validated."""
    cfg = build_config(BaselineConfig, presets, preset, overrides, f"{method} setting", fixed={"method": method})
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
    from ...training.sampling import save_png

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
        templates = P.SOURCE_TEMPLATES if concept == "source" else P.REFERENCE_TEMPLATES
        k = 0 if cfg.templates == "fixed" else int(torch.randint(len(templates), (1,), generator=self.generator))
        return templates[k].format(v1=cfg.v1, v2=cfg.v2)

    def composed_prompt(self) -> str:
        return P.composed_prompt(self.cfg.v1, self.cfg.v2)

    # -- one micro-step: one source + one reference image (+ one class image each), one UNet pass
    def micro_step(self, phase: str, step: int) -> StepOutput:
        cfg = self.cfg
        kinds = ["source"] * cfg.per_concept + ["reference"] * cfg.per_concept
        n_inst = len(kinds)
        if cfg.prior:
            kinds += ["class"] * n_inst
        latents, prompts, indices = [], [], []
        for kind in kinds:
            z, *_, i = self.data.draw(kind)
            latents.append(z)
            prompts.append(self.prompt(kind))
            indices.append(i)
        z0 = torch.cat(latents)
        noise = torch.randn(z0.shape, generator=self.generator).to(z0)
        t = torch.randint(0, cfg.t_max, (z0.shape[0],), generator=self.generator).to(self.device)
        z_t = self.comps.scheduler.add_noise(z0, noise, t.cpu()).to(z0)
        emb, positions = encode_prompt(self.comps, prompts, self.token_ids, self.device)
        pred = self.comps.unet(z_t, t, emb).sample
        target = noise if self.comps.prediction_type == "epsilon" else self.comps.scheduler.get_velocity(z0, noise, t.cpu())
        err = denoising_loss(pred, target, per_sample=True)  # Eq. 1 per example
        # L_instance = mean over the instance images = 1/2 source + 1/2 reference; + prior_weight * L_prior (Eq. 2)
        parts = {"source": slice(0, cfg.per_concept), "reference": slice(cfg.per_concept, n_inst)}
        if cfg.prior:
            parts["class"] = slice(n_inst, len(kinds))
        record = {}
        for name, sl in parts.items():
            rows = range(len(kinds))[sl]
            tokens = tuple(tok for k, tok in enumerate(cfg.tokens()) if bool((positions[sl, k] >= 0).any()))
            record["prior" if name == "class" else name] = Term(
                err[sl].mean(), cfg.prior_weight if name == "class" else 0.5, concept=name,
                index=[indices[r] for r in rows], mask_kind="none", tokens=tokens, prompt=[prompts[r] for r in rows],
                t=t[sl], t_range=(0, cfg.t_max))
        loss = sum(term.weight * term.value for term in record.values())
        terms = {"loss_instance": err[:n_inst].mean().item(), "loss_source": record["source"].value.item(),
                 "loss_reference": record["reference"].value.item()}
        if cfg.prior:
            terms["loss_prior"] = record["prior"].value.item()
        terms["loss"] = loss.item()
        return StepOutput(loss, terms, "source+reference" + ("+class" if cfg.prior else ""), record)

    # -- state (subclasses add their weights)
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"embedding.rows": self.embedding.rows.detach().clone()} if self.embedding is not None else {}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.embedding is not None:
            with torch.no_grad():
                self.embedding.rows.copy_(state["embedding.rows"])

    # -- samples and outputs
    @torch.no_grad()
    def sample(self, run: RunDir, step: int, n: int = 2):
        from ...training.sampling import sample_grid

        grid = sample_grid(self.comps.pipeline(), list(self.cfg.sample_prompts) or [self.composed_prompt()], n,
                           self.cfg.sample_steps, self.cfg.resolution, self.cfg.seed)
        atomic_write(run.samples / f"step-{step:06d}.png", lambda p: grid.save(p, format="PNG"))
        return grid

    @abstractmethod
    def export(self, run: RunDir) -> None:
        """Write the method's weights into the run folder (each baseline has its own format)."""

    def finalize(self, run: RunDir) -> None:
        self.sample(run, self.cfg.total_steps)
        self.export(run)

    def save_tokens(self, run: RunDir) -> None:
        """``embeddings/<token>.safetensors`` (what ``load_textual_inversion`` reads)."""
        from ...models.tokens import token_vectors
        from ...training.export import save_embeddings

        save_embeddings(run.path, self.cfg.tokens(), token_vectors(self.comps.text_encoder, self.token_ids))


# ---------------------------------------------------------------------------------------------------------------
# The whole job: prepare, base model, class images, config, train
# ---------------------------------------------------------------------------------------------------------------


def run_baseline(method_cls: type[Baseline], source, reference, out, cfg: BaselineConfig, resume: bool = False,
                 progress: bool = True, device: str | None = None) -> RunDir:
    """Train ``method_cls`` into the run folder ``out`` (``resume`` continues an unfinished one)."""
    from ...training.distributed import process_state
    from ...training.job import run_method

    def setup(run, cfg, comps, source_set, reference_set, device):
        comps.to(device)
        class_set = None
        if cfg.prior:
            root = Path(cfg.class_dir) if cfg.class_dir else run.path / "class_images"
            with process_state().main_process_first():  # made once, by the main process; the others read them
                paths = ensure_class_images(comps, cfg, class_image_folder(cfg, root), progress)
            class_set = images_as_concept(paths, cfg.resolution)
        return lambda: method_cls(cfg, comps, source_set, reference_set, class_set, device), method_cls.run_config

    return run_method(source, reference, out, cfg, setup, resume=resume, progress=progress, device=device)
