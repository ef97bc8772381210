"""``magicstudio toyworld pretrain``: train the toy world's LDM and encoders from scratch on the CPU.

Three stages, each resumable (``WORK/``: stage results and checkpoints, safetensors + JSON):

1. the VAE (``AutoencoderKL``): L1 + MSE reconstruction (head pixels weighted 5x: eyes and glasses are a few
   pixels wide) with a tiny KL weight on fresh pictures; the latent
   scaling factor is then set to 1/std of the latents, as for Stable Diffusion;
2. the text-to-image model (``UNet2DConditionModel`` + ``CLIPTextModel`` from scratch): epsilon-prediction DDPM loss
   on the scaled-linear schedule of SD (1000 steps), captions dropped 10% of the time (classifier-free guidance),
   EMA of the weights, on a fixed set of pre-encoded pictures (latents sampled from the posterior every step);
3. the toy identity, face and style encoders (cross-entropy on the world's labels, fresh pictures every step).

Held-out identities and styles never appear. The results go to ``DEST`` (default: the packaged
``magicstudio/assets/toyworld/``): ``ldm.safetensors`` (fp16, sparse token table) and ``encoders.safetensors``.
Same seed and one CPU thread -> identical weights; with more threads results differ in the last bits.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...data import toyworld as world
from ...errors import UserError
from ...io import save_tensors, write_json
from ...models import toyworld as tw
from ...training.personalize import check_seed
from ...training.state import load_state, save_state


@dataclass
class PretrainConfig:
    seed: int = 0
    vae_steps: int = 4000
    vae_head_weight: float = 4.0  # the faces' few-pixel details (eyes, glasses) matter most: weight head pixels 5x
    vae_face_weight: float = 8.0  # and face pixels (eyes, glasses, earrings nearby) 13x (0: the first model's VAE)
    vae_lr: float = 2e-3
    vae_batch: int = 32
    ldm_steps: int = 7000
    ldm_lr: float = 1e-3
    ldm_batch: int = 32
    ldm_head_weight: float = 3.0  # > 0: head latents weighted 1 + this in the loss (the identity's few pixels)
    offset_noise: float = 0.1  # per-picture, per-channel constant added to the noise: colours follow the prompt
    captions: str = "described"  # caption design (data.toyworld.CAPTIONS): "described" or "alt-text" (first model)
    ema: float = 0.999
    cond_drop: float = 0.1
    data_size: int = 40000
    encoder_steps: int = 500
    identity_encoder_steps: int = 1500  # the CSIM network: eye colour is two pixels in its window
    encoder_batch: int = 64
    checkpoint_every: int = 250
    ldm_init: str = ""  # continue from this toy-world model file's UNet and text encoder ("": from scratch)
    vae_init: str = ""  # start the autoencoder stage from this toy-world model file's VAE ("": from scratch)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


def _cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------------------------


def vae_pixel_weight(heads: list, faces: list, cfg: PretrainConfig) -> torch.Tensor:
    """Per-pixel weight [n, 1, 64, 64] of the autoencoder loss: 1, plus ``vae_head_weight`` on the head, plus
    ``vae_face_weight`` on the face (eye colour and glasses are a few pixels each)."""
    head = torch.from_numpy(np.stack(heads) / 255.0).float()[:, None]
    face = torch.from_numpy(np.stack(faces) / 255.0).float()[:, None]
    return 1.0 + cfg.vae_head_weight * head + cfg.vae_face_weight * face


def training_noise(shape: tuple, offset: float, gen: torch.Generator) -> torch.Tensor:
    """The text-to-image stage's noise: N(0, 1) plus ``offset`` x one N(0, 1) constant per picture and channel
    ("offset noise"). Without it the model learns that at t=T the noise's spatial mean still carries the picture's
    mean colour, and at sampling time takes the colour from the initial noise instead of from the prompt (the first
    toy model drew the palette at chance level)."""
    noise = torch.randn(shape, generator=gen)
    if offset:
        noise = noise + offset * torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=gen)
    return noise


def train_vae(vae, cfg: PretrainConfig, work: Path, progress: bool) -> None:
    ckpt = work / "vae-ckpt"
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    start = 0
    rng = np.random.default_rng([cfg.seed, 1])
    if (work / "vae-ckpt.json").is_file():
        st = load_state(ckpt)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        rng.bit_generator.state = json.loads(st["rng"])
        torch.set_rng_state(st["torch_rng"])
    vae.train()
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps)
        heads: list = []
        faces: list = []
        x = _to_tensor(world.pretraining_batch(rng, cfg.vae_batch, heads, faces=faces)[0])
        weight = vae_pixel_weight(heads, faces, cfg)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        err = rec - x
        loss = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            _say(f"  vae {step + 1}/{cfg.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", progress)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_state(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                              "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state()})
    vae.eval()


@torch.no_grad()
def latent_scale(vae, seed: int, n: int = 512) -> float:
    rng = np.random.default_rng([seed, 2])
    x = _to_tensor(world.pretraining_batch(rng, n)[0])
    z = vae.encode(x).latent_dist.mean
    return float(1.0 / z.std())


# --------------------------------------------------------------------------------------------------------------
# Stage 2: the text-to-image model
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def make_dataset(comps, cfg: PretrainConfig, progress: bool) -> dict[str, torch.Tensor]:
    """``data_size`` pictures -> posterior mean/std latents (scaled), token ids and head masks at latent size."""
    rng = np.random.default_rng([cfg.seed, 3])
    means, stds, ids, heads = [], [], [], []
    scale = comps.vae.config.scaling_factor
    t0 = time.time()
    for start in range(0, cfg.data_size, 256):
        n = min(256, cfg.data_size - start)
        masks: list = []
        images, captions, _, _ = world.pretraining_batch(rng, n, masks, cfg.captions)
        post = comps.vae.encode(_to_tensor(images)).latent_dist
        head = torch.from_numpy(np.stack(masks)).float()[:, None] / 255.0
        heads.append(F.adaptive_avg_pool2d(head, post.mean.shape[-2:]))
        means.append(post.mean * scale)
        stds.append(post.std * scale)
        ids.append(comps.tokenizer(captions, padding="max_length", max_length=comps.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids)
    _say(f"  dataset: {cfg.data_size} pictures encoded in {time.time() - t0:.0f} s", progress)
    return {"mean": torch.cat(means), "std": torch.cat(stds), "ids": torch.cat(ids), "head": torch.cat(heads)}


def train_ldm(comps, cfg: PretrainConfig, work: Path, progress: bool) -> dict[str, torch.Tensor]:
    """Train UNet + text encoder; returns the EMA weights (``unet.*`` / ``text_encoder.*``)."""
    cached = work / "dataset.safetensors"  # encoded once, kept for resumes (rebuilt when its recipe differs)
    recipe = {"seed": str(cfg.seed), "data_size": str(cfg.data_size), "captions": cfg.captions,
              "scaling_factor": repr(float(comps.vae.config.scaling_factor))}
    data = None
    if cached.is_file():
        from safetensors import safe_open

        with safe_open(str(cached), framework="pt") as f:
            if (f.metadata() or {}) == recipe:
                data = {k: f.get_tensor(k) for k in f.keys()}
        if data is None:
            _say(f"  {cached.name} was made with other settings: encoding the pictures again", progress)
    if data is None:
        data = make_dataset(comps, cfg, progress)
        save_tensors(cached, data, metadata=recipe)
    empty = comps.tokenizer([""], padding="max_length", max_length=comps.tokenizer.model_max_length,
                            return_tensors="pt").input_ids[0]
    unet, te, sched = comps.unet, comps.text_encoder, comps.scheduler
    emb = te.get_input_embeddings().weight
    others = [p for p in list(unet.parameters()) + list(te.parameters()) if p is not emb]
    opt = torch.optim.AdamW([{"params": others, "weight_decay": 1e-2}, {"params": [emb], "weight_decay": 0.0}],
                            lr=cfg.ldm_lr, betas=(0.9, 0.99))
    named = {**{f"unet.{k}": p for k, p in unet.named_parameters()},
             **{f"text_encoder.{k}": p for k, p in te.named_parameters()}}
    ema = {k: p.detach().clone() for k, p in named.items()}
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    start = 0
    ckpt = work / "ldm-ckpt"
    if (work / "ldm-ckpt.json").is_file():
        st = load_state(ckpt)
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        gen.set_state(st["gen"])
        start = st["step"]
        _say(f"  resuming the LDM at step {start}", progress)
    unet.train()
    te.train()
    t0, losses = time.time(), []
    for step in range(start, cfg.ldm_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.ldm_lr * _cosine_lr(step, cfg.ldm_steps, warmup=200)
        idx = torch.randint(0, cfg.data_size, (cfg.ldm_batch,), generator=gen)
        z0 = data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)
        ids = data["ids"][idx].clone()
        drop = torch.rand(cfg.ldm_batch, generator=gen) < cfg.cond_drop
        ids[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.ldm_batch,), generator=gen)
        noise = training_noise(z0.shape, cfg.offset_noise, gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, te(ids)[0]).sample
        if cfg.ldm_head_weight:
            weight = 1.0 + cfg.ldm_head_weight * data["head"][idx]
            loss = ((pred - noise).pow(2) * weight).mean() / weight.mean()
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(others, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for k, p in named.items():
                ema[k].mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            rate = (time.time() - t0) / max(1, len(losses))
            _say(f"  ldm {step + 1}/{cfg.ldm_steps} loss {np.mean(losses[-100:]):.4f} "
                 f"({rate:.2f} s/step, ~{rate * (cfg.ldm_steps - step - 1) / 60:.0f} min left)", progress)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.ldm_steps:
            save_state(ckpt, {"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                              "ema": ema, "gen": gen.get_state(), "step": step + 1})
    unet.eval()
    te.eval()
    return ema


def used_token_ids(tokenizer) -> list[int]:
    """Every token id the world's captions (and the methods' prompts) can produce."""
    words = set()
    for values in list(world.IDENTITY_ATTRS.values()) + list(world.STYLE_ATTRS.values()):
        for v in values:
            words.update(v.split())
    words.update("a an the photo portrait painting image picture of person with hair eyes skin face wearing in style "
                 "close-up".split())
    ids = set(tokenizer(" ".join(sorted(words))).input_ids)
    rng = np.random.default_rng(0)
    for _ in range(2000):  # the captions themselves (covers every template)
        ident, style = world.random_identity(rng), world.random_style(rng)
        for design in world.CAPTIONS.values():
            ids.update(tokenizer((design or world.caption)(ident, style, rng)).input_ids)
    ids.update([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return sorted(ids)


# --------------------------------------------------------------------------------------------------------------
# Stage 3: encoders
# --------------------------------------------------------------------------------------------------------------


def _face_batch(rng: np.random.Generator, n: int, held_out: bool = False):
    """Pictures, their ArcFace-aligned faces, identity and style labels."""
    from ...models.face_align import align_faces

    imgs, lms, ids, sts = [], [], [], []
    for _ in range(n):
        ident = world.random_identity(rng, held_out=held_out)
        style = world.random_style(rng, held_out=held_out)
        p = world.render(ident, style, rng)
        imgs.append(p.image)
        lms.append(p.landmarks5)
        ids.append(ident.labels())
        sts.append(style.labels())
    x = _to_tensor(np.stack(imgs))
    aligned = align_faces(x, torch.tensor(np.stack(lms), dtype=torch.float32), 112)
    return x, aligned, torch.tensor(ids), torch.tensor(sts)


def train_encoders(cfg: PretrainConfig, progress: bool) -> tuple[dict[str, tw.AttributeNet], dict[str, list[float]]]:
    id_classes = [len(v) for v in world.IDENTITY_ATTRS.values()]
    st_classes = [len(v) for v in world.STYLE_ATTRS.values()]
    nets, accuracy = {}, {}
    for k, (kind, classes) in enumerate((("identity", id_classes), ("face", id_classes), ("style", st_classes))):
        torch.manual_seed(cfg.seed + 10 + k)
        net = tw.AttributeNet(classes, pool="max" if kind == "identity" else "avg")
        steps = cfg.identity_encoder_steps if kind == "identity" else cfg.encoder_steps
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        rng = np.random.default_rng([cfg.seed, 5, k])
        t0 = time.time()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = 2e-3 * _cosine_lr(step, steps, warmup=50, floor=0.02)
            x, aligned, ids, sts = _face_batch(rng, cfg.encoder_batch)
            labels = sts if kind == "style" else ids
            logits = net(tw.encoder_input(kind, aligned if kind == "face" else x))
            loss = sum(F.cross_entropy(z, labels[:, i]) for i, z in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        # accuracy on the held-out identities / styles (never seen by the encoders either)
        with torch.no_grad():
            x, aligned, ids, sts = _face_batch(np.random.default_rng([cfg.seed, 6, k]), 256, held_out=True)
            labels = sts if kind == "style" else ids
            logits = net(tw.encoder_input(kind, aligned if kind == "face" else x))
            accuracy[kind] = [round(float((z.argmax(-1) == labels[:, i]).float().mean()), 3) for i, z in enumerate(logits)]
        _say(f"  {kind} encoder: {steps} steps in {time.time() - t0:.0f} s; held-out accuracy per "
             f"attribute {accuracy[kind]}", progress)
        nets[kind] = net
    return nets, accuracy


# --------------------------------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------------------------------


def vae_from(model_file: str | Path, work: str | Path) -> Path:
    """Take the VAE of an existing toy-world model file as stage 1's result (``WORK/vae.safetensors``), so a new
    text-to-image stage can be trained without re-training the autoencoder."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    return save_tensors(work / "vae.safetensors", vae_state(model_file, "--vae-from"))


def vae_state(model_file: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """The VAE weights (fp32) of a toy-world model file (of any text-encoder width)."""
    from safetensors import safe_open

    src = Path(model_file)
    if not src.is_file():
        raise UserError(f"{flag}: {src} is not a file")
    with safe_open(str(src), framework="pt") as f:
        if (f.metadata() or {}).get("format") != "magicstudio-toyworld-ldm":
            raise UserError(f"{flag}: {src} is not a toy-world model file")
        return {k[4:]: f.get_tensor(k).float().contiguous() for k in f.keys() if k.startswith("vae.")}


def pretrain(work: str | Path, dest: str | Path | None = None, cfg: PretrainConfig | None = None,
             progress: bool = True, stages: tuple[str, ...] = ("vae", "ldm", "encoders")) -> dict:
    """Run (or resume) the pretraining; returns a summary (also written to ``WORK/summary.json``)."""
    cfg = cfg or PretrainConfig()
    work, dest = Path(work), Path(dest) if dest else tw.ASSETS
    check_seed(cfg.seed)
    try:  # both folders are checked before an hour of training, not when the results are saved
        for folder in (work, dest):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot use {exc.filename or folder} as a folder ({exc.strerror or exc})") from None
    write_json(work / "config.json", asdict(cfg))
    torch.manual_seed(cfg.seed)
    summary: dict = {"config": asdict(cfg), "threads": torch.get_num_threads()}
    t_all = time.time()
    if cfg.ldm_init:
        if not Path(cfg.ldm_init).is_file():
            raise UserError(f"--init-from: {cfg.ldm_init} is not a file")
        start = tw.load_toyworld(cfg.ldm_init)
        comps = tw.build_toyworld(cfg.seed, text_width=start.text_encoder.config.hidden_size)
    else:
        comps = tw.build_toyworld(cfg.seed)
    if cfg.ldm_init:
        comps.unet.load_state_dict(start.unet.state_dict())
        comps.text_encoder.load_state_dict(start.text_encoder.state_dict())
    vae_file = work / "vae.safetensors"
    if "vae" in stages or "ldm" in stages:
        if vae_file.is_file():
            from safetensors.torch import load_file

            comps.vae.load_state_dict(load_file(str(vae_file)))
        else:
            if cfg.vae_init:
                comps.vae.load_state_dict(vae_state(cfg.vae_init, "--vae-init"))
            _say(f"1/3 VAE ({cfg.vae_steps} steps{', from ' + cfg.vae_init if cfg.vae_init else ''})", progress)
            t0 = time.time()
            train_vae(comps.vae, cfg, work, progress)
            summary["vae_s"] = round(time.time() - t0)
            save_tensors(vae_file, comps.vae.state_dict())
        scale = latent_scale(comps.vae, cfg.seed)
        comps.vae.register_to_config(scaling_factor=scale)
        summary["scaling_factor"] = scale
    if "ldm" in stages:
        _say(f"2/3 text-to-image model ({cfg.ldm_steps} steps, batch {cfg.ldm_batch})", progress)
        t0 = time.time()
        ema = train_ldm(comps, cfg, work, progress)
        summary["ldm_s"] = round(time.time() - t0)
        with torch.no_grad():
            for prefix, module in (("unet.", comps.unet), ("text_encoder.", comps.text_encoder)):
                for k, p in module.named_parameters():
                    p.copy_(ema[prefix + k])
            # EMA arithmetic may move untouched rows by an ulp: restore them exactly
            table = comps.text_encoder.get_input_embeddings().weight
            ids = used_token_ids(comps.tokenizer)
            keep = torch.ones(len(table), dtype=torch.bool)
            keep[ids] = False
            table[keep] = tw.initial_token_embedding(cfg.seed, table.shape[1])[keep]
        summary["ldm_file"] = str(tw.save_toyworld(comps, dest / tw.LDM_FILE, ids, cfg.seed))
    if "encoders" in stages:
        _say(f"3/3 toy identity, face and style encoders ({cfg.identity_encoder_steps} / {cfg.encoder_steps} / "
             f"{cfg.encoder_steps} steps)", progress)
        t0 = time.time()
        nets, acc = train_encoders(cfg, progress)
        summary["encoders_s"] = round(time.time() - t0)
        summary["encoder_accuracy"] = acc
        summary["encoders_file"] = str(tw.save_toy_encoders(nets, dest / tw.ENCODERS_FILE))
    summary["total_s"] = round(time.time() - t_all)
    write_json(work / "summary.json", summary)
    return summary
