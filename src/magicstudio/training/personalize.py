"""Data and prompt pieces every personalisation method shares (MagiCapture and the baselines).

``ConceptSampler`` draws one augmented training example of a named concept (``"source"``, ``"reference"``,
``"class"``, ...) as a VAE latent with its face mask, landmarks and box, every random choice coming from the
method's ``torch.Generator`` (so a resumed run replays the same draws). ``encode_prompt`` runs the text encoder
on one prompt and says where each placeholder token sits in it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..errors import UserError

from .concepts import FLIP_ORDER, ConceptSet, augment

log = logging.getLogger(__name__)


class ConceptSampler:
    """Augmented examples of named ``ConceptSet``s as latents.

    With ``cache_latents`` the VAE encodes every image and its mirror once (latent mean and std); each draw then
    samples ``mean + std * noise``. Colour jitter is off in that mode (it would change the moments).
    """

    def __init__(self, comps, concepts: dict[str, ConceptSet], generator: torch.Generator,
                 device: torch.device | str = "cpu", hflip: bool = True, color_jitter: float = 0.1,
                 cache_latents: bool = False):
        self.comps, self.concepts, self.generator = comps, concepts, generator
        self.device = torch.device(device)
        self.hflip, self.color_jitter = hflip, color_jitter
        self.cache = self._cache_latents() if cache_latents else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of ``images`` ([-1, 1]), sampled from the VAE posterior with the method's generator."""
        vae = self.comps.vae
        with torch.no_grad():
            dist = vae.encode(images.to(self.device, vae.dtype)).latent_dist
            return dist.sample(generator=self.generator) * vae.config.scaling_factor

    def _cache_latents(self) -> dict:
        cache = {}
        vae = self.comps.vae
        with torch.no_grad():
            for name, concept in self.concepts.items():
                for flip in (False, True):
                    imgs = concept.images.flip(-1) if flip else concept.images
                    dist = vae.encode(imgs.to(self.device, vae.dtype)).latent_dist
                    cache[(name, flip)] = (dist.mean, dist.std)
        return cache

    def draw(self, name: str):
        """One augmented example of concept ``name``: (latent, face mask, landmarks, box, image index)."""
        concept = self.concepts[name]
        i = int(torch.randint(len(concept), (1,), generator=self.generator))
        sl = slice(i, i + 1)
        if self.cache is None:
            img, mask, lm, box = augment(concept.images[sl], concept.face_masks[sl], concept.landmarks[sl],
                                         concept.boxes[sl], self.generator, self.hflip, self.color_jitter)
            latents = self.encode(img)
        else:
            flip = self.hflip and bool(torch.rand(1, generator=self.generator) < 0.5)
            img, mask, lm, box = augment(concept.images[sl], concept.face_masks[sl], concept.landmarks[sl],
                                         concept.boxes[sl], self.generator, hflip=False, jitter=0.0)
            if flip:
                img, mask = img.flip(-1), mask.flip(-1)
                lm = lm[:, FLIP_ORDER]
                lm[..., 0] = (img.shape[-1] - 1) - lm[..., 0]
                box = torch.stack([img.shape[-1] - box[:, 2], box[:, 1], img.shape[-1] - box[:, 0], box[:, 3]], 1)
            mean, std = self.cache[(name, flip)]
            noise = torch.randn(mean[sl].shape, generator=self.generator).to(mean)
            latents = (mean[sl] + std[sl] * noise) * self.comps.vae.config.scaling_factor
        return latents, mask.to(self.device), lm, box, i


def add_concept_tokens(comps, cfg, device: torch.device | str = "cpu", trainable: bool = True):
    """The setup every method shares: move ``comps`` to ``device`` and freeze them, add ``cfg.v1`` / ``cfg.v2``
    (initialised from ``cfg.v1_init`` / ``cfg.v2_init``, random inits drawn from ``cfg.seed + 7``) and, when
    ``trainable``, wrap the text encoder's embedding so only the new rows train. Returns (token ids, the
    ``PlaceholderEmbedding`` or None)."""
    from ..models.tokens import TokenSpec, add_placeholder_tokens, make_trainable

    comps.to(device)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.requires_grad_(False)
    init_gen = torch.Generator().manual_seed(cfg.seed + 7)
    token_ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder,
                                       [TokenSpec(cfg.v1, cfg.v1_init), TokenSpec(cfg.v2, cfg.v2_init)],
                                       generator=init_gen)
    embedding = make_trainable(comps.text_encoder, token_ids) if trainable else None
    if embedding is not None:
        embedding.to(device)
    return token_ids, embedding


def encode_prompt(comps, prompt: str | list[str], token_ids: list[int], device: torch.device | str = "cpu"):
    """Text-encoder hidden states of ``prompt`` (one string or a batch) and, per prompt, the position of each
    placeholder in ``token_ids`` (-1 where it does not occur): ((B, 77, D), (B, K))."""
    tok = comps.tokenizer
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    positions = torch.full((len(prompts), len(token_ids)), -1, dtype=torch.long)
    for b in range(len(prompts)):
        for k, tid in enumerate(token_ids):
            hits = (ids[b] == tid).nonzero().flatten()
            if len(hits):
                positions[b, k] = int(hits[0])
    return comps.text_encoder(ids)[0], positions


def prepared_dir(folder: str | Path, role: str, cache_root: Path, size: int, progress: bool = True,
                 name: str | None = None) -> Path:
    """``folder`` itself when ``magicstudio prepare`` made it, else a prepared copy under ``cache_root``
    (in ``cache_root/name``, ``name`` defaulting to the role; ``name`` also names the set in messages)."""
    from ..data.prepare import MANIFEST, load_prepared, prepare_folder

    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{role} folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{role}: {folder} is a file, not a folder of photos")
    if (folder / MANIFEST).is_file():  # made by `prepare`: use it as it is, or say what is wrong with it
        prepared = load_prepared(folder)
        if prepared.role != role:
            log.warning("%s was prepared as a %s set and is used as the %s set here", folder, prepared.role, role)
        return folder
    label = name or role
    out = cache_root / label
    report = prepare_folder(folder, role, out, size=size, progress=progress)
    if not report.items:
        raise UserError(f"no usable {label} image in {folder}: " + "; ".join(f"{r.path}: {r.reason}" for r in report.rejected[:3]))
    for r in report.rejected:  # the photos left out, and why (prepare lists them too)
        log.warning("%s photo skipped: %s: %s", label, r.path, r.reason)
    for w in report.warnings:
        log.warning("%s: %s", label, w)
    return out


def check_run_settings(cfg) -> None:
    """The settings every method shares, checked before anything is written (one line each)."""
    res = cfg.resolution
    if res is not None and not (64 <= res <= 2048 and res % 8 == 0):
        raise UserError(f"--resolution {res}: must be a multiple of 8 between 64 and 2048 (leave it out for the "
                        "model's own size)")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"--mixed-precision {cfg.mixed_precision!r}: choose no, fp16 or bf16")
    check_seed(cfg.seed)


def check_seed(seed: int) -> None:
    """A training seed seeds torch, the method's generator and numpy: it must fit 64 signed bits."""
    if not -2**63 <= int(seed) < 2**63:
        raise UserError(f"--seed {seed} is out of range (|seed| < 2**63)")


#: settings a resumed run may take from the resuming command: they change when and what is logged, saved or
#: sampled, or how memory is traded for time (the same arithmetic), never the weights
RESUME_SAFE = frozenset({"checkpoint_every", "keep_checkpoints", "sample_every", "sample_steps", "sample_prompts", "log_every",
                         "gradient_checkpointing", "decode_checkpointing"})


def open_run(source, reference, out, cfg, resume: bool = False, progress: bool = True, named: dict | None = None):
    """Everything a personalisation run does before its method exists, the same for every method.

    Takes the run folder's lock (held until ``close_run``; a second process is refused with the holder's pid);
    refuses to overwrite a run (finished, or unfinished without ``resume``); on resume refuses other photos or
    settings that would change the result (naming them) and takes the safe ones (``RESUME_SAFE``), saying so;
    loads the base model, resolves the resolution, prepares the photo folders (cached in the run) and loads
    them as ``ConceptSet``s. Returns ``(run, cfg, comps, source_set, reference_set)``, or None when ``resume``
    finds the run already finished. A start refused before ``config.yaml`` leaves no folder behind.

    ``named`` ({name: folder}, for methods whose photo sets are not a source and a reference, e.g. MagicTailor's
    concept and components) replaces ``source`` and ``reference``: every folder is prepared as a reference set
    (its composition kept) and recorded under its name; the result is then ``(run, cfg, comps, {name: set}, None)``.
    """
    from .runs import RunDir

    run = RunDir(out)
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--out {run.path} is a file, not a folder")
    if resume and not run.path.is_dir():
        raise UserError(f"nothing to resume in {run.path}: no run was started there (leave out --resume to start one)")
    if not run.config_path.exists():
        foreign = run.foreign_entries()
        if foreign:
            raise UserError(f"--out {run.path} already holds other files ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder (nothing was written)")
        if not resume:
            check_run_settings(cfg)  # before the folder exists
    run.created = not run.path.exists()
    run.lock()
    try:
        folders = ({"source": (source, "source"), "reference": (reference, "reference")} if named is None
                   else {name: (folder, "reference") for name, folder in named.items()})
        opened = _open_locked(run, folders, cfg, resume, progress)
        if opened is not None and named is None:
            run_, cfg_, comps, sets = opened
            opened = run_, cfg_, comps, sets["source"], sets["reference"]
        elif opened is not None:
            opened = (*opened, None)
    except BaseException:
        close_run(run, failed=run.created)
        raise
    if opened is None:
        close_run(run)
    return opened


def close_run(run, failed: bool = False) -> None:
    """Release the run folder's lock; ``failed`` (a start refused in a folder it made): remove the folder unless
    the run got as far as its first training step (metrics.jsonl or a checkpoint: what a user may want to see or
    resume). A refused start (bad settings, missing weights, ...) leaves no folder behind."""
    import shutil

    try:
        if failed and run.path.is_dir() and not run.metrics_path.exists() and run.latest_checkpoint() is None:
            shutil.rmtree(run.path, ignore_errors=True)
    finally:
        run.unlock()


@contextmanager
def held_run(run):
    """The rest of a run's work (config, training, exports) under the lock ``open_run`` took; ``close_run`` after."""
    try:
        yield run
    except BaseException:
        close_run(run, failed=getattr(run, "created", False))
        raise
    close_run(run)


def _open_locked(run, folders: dict, cfg, resume, progress):
    """``folders``: {name: (folder, prepare role)}; returns (run, cfg, comps, {name: ConceptSet}) or None."""
    from ..models.base import load_base
    from .concepts import load_concept
    from .runs import folder_fingerprint

    if run.is_done():
        if resume:
            print(f"{run.path} has already finished training; nothing to resume.")
            return None
        raise UserError(f"{run.path} holds a finished run; choose another --out (nothing was overwritten)")
    started = run.config_path.exists() and run.latest_checkpoint() is not None
    if started and not resume:
        raise UserError(f"{run.path} holds an unfinished run; pass --resume to continue it, or choose another --out")
    if resume and not started:
        log.warning("%s has no checkpoint yet: starting it again with this command's settings", run.path)
    inputs = {}
    for role, (folder, _) in folders.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{role} folder not found: {folder}" if not folder.exists()
                            else f"{role}: {folder} is a file, not a folder of photos")
        inputs[role] = str(folder)
        inputs[f"{role}_sha256"] = folder_fingerprint(folder)
    if started:  # continue the same run, or refuse with the difference named
        saved = run.read_config()
        cfg = _resume_settings(run, saved, cfg, inputs)
    check_run_settings(cfg)
    run.inputs = inputs  # written into config.yaml by the method (see ``run_config``)
    comps = load_base(cfg.model)
    cfg = replace(cfg, resolution=cfg.resolution or comps.resolution)
    if cfg.resolution % comps.vae_scale:
        raise UserError(f"resolution {cfg.resolution} must be a multiple of {comps.vae_scale}")
    prep_size = max(cfg.resolution, 512)
    sets = {}
    for name, (folder, role) in folders.items():
        folder_ = prepared_dir(folder, role, run.path / "prepared", prep_size, progress, name=name)
        sets[name] = load_concept(folder_, cfg.resolution)
    return run, cfg, comps, sets


def _resume_settings(run, saved: dict, cfg, inputs: dict):
    """The config a resumed run continues with: the saved one, plus this command's ``RESUME_SAFE`` settings.
    UserError naming every other difference (photos, base model, steps, learning rates, ...)."""
    mine = asdict(cfg)
    diffs = []
    for role in [k for k in inputs if not k.endswith("_sha256")]:
        old = saved.get(f"{role}_sha256")
        if old is None:  # a run folder from before fingerprints: the folder name is all there is
            log.warning("%s does not record its %s photos' checksum; cannot check that --%s holds the same photos",
                        run.path, role, role)
        elif old != inputs[f"{role}_sha256"]:
            diffs.append(f"--{role} {inputs[role]} holds other photos than the run's ({saved.get(role)})")
    changed = {k: (mine[k], v) for k, v in saved.items() if k in mine and mine[k] is not None and mine[k] != v}
    unsafe = {k: d for k, d in changed.items() if k not in RESUME_SAFE}
    diffs += [f"{k}={new!r} (the run: {old!r})" for k, (new, old) in unsafe.items()]
    if diffs:
        raise UserError(f"--resume continues the run in {run.path} as it was started, but this command differs: "
                        f"{'; '.join(diffs)}. Resume with the run's inputs and settings (its config.yaml), or "
                        "start a new run in another --out (nothing was changed)")
    safe = {k: new for k, (new, old) in changed.items()}
    if safe:
        log.warning("resuming %s with %s (safe to change: they do not change the weights)", run.path,
                    ", ".join(f"{k}={v!r} (was {saved[k]!r})" for k, v in safe.items()))
    return replace(cfg, **{k: v for k, v in saved.items() if k in mine and k not in safe})


def process_device() -> torch.device:
    """This process's device: GPU i under ``accelerate launch``, the GPU if there is one, else the CPU."""
    from .distributed import process_state

    return process_state().device
