"""MagicTailor training (arXiv 2410.13370), readable top to bottom.

Every step takes the images of every concept/component (all of them, the authors' batching, or
``images_per_concept`` of each), prompt "A photo of <vi>" with <vi> that image's token. DM-Deg (Sec. 3.2) perturbs
each image outside its training mask with an intensity that decays over the whole run. Then:

- warm-up (``warmup_steps``): masked diffusion loss over all images + ``lambda_attn`` x the cross-attention loss;
- DS-Bal (``dsbal_steps``, Sec. 3.3): sample-wise min-max: only the concept/component whose mean masked diffusion
  loss is the largest is optimised with it; the others get ``lambda_pres`` x MSE to the momentum branch's output;
  + the cross-attention loss on all images. The momentum branch is the EMA of the LoRA adapter (``AdapterEMA``,
  updated after every optimizer step, the first update a copy) swapped into the same frozen U-Net for one no-grad
  pass, fed the online text embeddings detached.

Both stages share one AdamW (as in the authors' loop); the DS-Bal learning rate is a per-step factor of it
(``Phase.lr_factor``). Only the new token rows and the LoRA train.
"""

from __future__ import annotations

import logging

import torch

from ...attention.capture import AttentionStore, install_capture, select_layers, stack_token_maps
from ...data.masks import downsample_mask
from ...io import atomic_write
from ...losses import (cross_attention_loss, degradation_weight, masked_degradation, masked_denoising_loss,
                       minmax_select, preservation_loss)
from ...models.tokens import TokenSpec, add_placeholder_tokens, make_trainable, token_vectors
from ...training.concepts import augment
from ...training.ema import AdapterEMA
from ...training.lora import add_lora, lora_config, lora_parameters
from ...training.loop import Phase, StepOutput, Term
from ...training.personalize import ConceptSampler, encode_prompt
from ...training.runs import RunDir
from .config import TailorConfig
from .masks import TrainingSet

log = logging.getLogger(__name__)

PROMPT = "A photo of {}"  # the authors' training prompt


class MagicTailor:
    def __init__(self, cfg: TailorConfig, comps, sets: list[TrainingSet], device: torch.device | str = "cpu"):
        self.cfg, self.comps, self.sets, self.device = cfg, comps, sets, torch.device(device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        comps.to(self.device)
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.requires_grad_(False)
        # <v0> (concept), <v1>, ... (components) from their class words; only these rows train
        self.tokens = cfg.tokens()
        specs = [TokenSpec(tok, ts.word) for tok, ts in zip(self.tokens, sets)]
        self.token_ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, specs)
        self.embedding = make_trainable(comps.text_encoder, self.token_ids).to(self.device)
        # explicit attention probabilities on the 16x16 cross-attention layers only (SDPA elsewhere)
        self.store = AttentionStore()
        install_capture(comps.unet, self.store, select_layers(comps.unet, cfg.attn_layers))
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        self.data = ConceptSampler(comps, {}, self.generator, self.device, hflip=False, color_jitter=0.0)
        self.latent_size = cfg.resolution // comps.vae_scale
        self.n_images = sum(len(s) for s in sets)
        self.ema: AdapterEMA | None = None
        self.last: dict = {}  # what the last micro-step fed in (the wiring tests read it)

    # ------------------------------------------------------------------ schedule
    def base_lr(self) -> float:
        """The optimizer's lr: the warm-up lr (the DS-Bal one when there is no warm-up), times the number of
        training images with ``scale_lr`` (the authors' --scale_lr)."""
        cfg = self.cfg
        lr = cfg.warmup_lr if cfg.warmup_steps > 0 else cfg.dsbal_lr
        return lr * (self.n_images if cfg.scale_lr else 1)

    def lr_factor(self, k: int) -> float:
        """The multiplier of ``base_lr`` at step ``k``: 1 in the warm-up, dsbal_lr / warmup_lr in DS-Bal; with
        ``dsbal_lr_first_step_only`` (official) only at DS-Bal's first step, as the authors' constant scheduler
        resets the lr they set to the warm-up value at the next ``lr_scheduler.step()``."""
        cfg = self.cfg
        if k < cfg.warmup_steps or cfg.warmup_steps == 0:
            return 1.0
        ratio = cfg.dsbal_lr / cfg.warmup_lr if cfg.warmup_lr else 0.0
        if cfg.dsbal_lr_first_step_only and k > cfg.warmup_steps:
            return 1.0
        return ratio

    def stage(self, step: int) -> str:
        return "warmup" if step < self.cfg.warmup_steps else "ds_bal"

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [Phase("magictailor", cfg.total_steps, self._setup, weight_decay=cfg.weight_decay,
                      grad_clip=cfg.grad_clip, lr_factor=self.lr_factor)]

    def _setup(self) -> list[dict]:
        cfg, unet = self.cfg, self.comps.unet
        with torch.random.fork_rng(devices=[]):  # LoRA init must not depend on where a run was resumed
            torch.manual_seed(cfg.seed + 11)
            if not getattr(unet, "peft_config", None):
                add_lora(unet, lora_config(cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha))
        unet.to(self.device)
        if self.ema is None:
            self.ema = AdapterEMA({n: p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad},
                                  cfg.ema_decay)
        lr = self.base_lr()
        return [{"params": lora_parameters(unet), "lr": lr}, {"params": [self.embedding.rows], "lr": lr}]

    # ------------------------------------------------------------------ one step
    def _batch(self):
        """Each set's images for this step: all of them, or ``images_per_concept`` drawn without replacement.
        Returns images (B, 3, R, R), masks (B, 1, R, R), the set of each sample and its index in that set."""
        k = self.cfg.images_per_concept
        imgs, masks, owner, index = [], [], [], []
        for i, ts in enumerate(self.sets):
            n = len(ts)
            idx = list(range(n)) if not k or k >= n else sorted(torch.randperm(n, generator=self.generator)[:k].tolist())
            imgs.append(ts.images.images[idx]), masks.append(ts.masks[idx])
            owner += [i] * len(idx)
            index += idx
        return torch.cat(imgs), torch.cat(masks), owner, index

    def micro_step(self, phase: str, step: int) -> StepOutput:
        cfg, comps = self.cfg, self.comps
        stage = self.stage(step)
        images, masks, owner, index = self._batch()
        b = images.shape[0]
        nan = torch.full((b, 5, 2), float("nan"))
        images, masks, _, _ = augment(images, masks, nan, torch.full((b, 4), float("nan")), self.generator,
                                      cfg.hflip, cfg.color_jitter)
        clean = images
        w = degradation_weight(step, cfg.total_steps, cfg.dmdeg_alpha, cfg.dmdeg_gamma, cfg.dmdeg_dynamic)
        if cfg.use_dmdeg:  # DM-Deg, pixel space, outside the mask
            images = masked_degradation(images, masks, w, self.generator)
        z0 = self.data.encode(images.to(self.device))
        noise = torch.randn(z0.shape, generator=self.generator).to(z0)
        t = torch.randint(0, comps.scheduler.config.num_train_timesteps, (b,), generator=self.generator)
        z_t = comps.scheduler.add_noise(z0, noise, t).to(z0)
        t = t.to(self.device)
        prompts = [PROMPT.format(self.tokens[i]) for i in owner]
        emb, positions = encode_prompt(comps, prompts, self.token_ids, self.device)
        dsbal = stage == "ds_bal" and cfg.use_dsbal
        momentum = None
        if dsbal:  # the momentum branch first: its weights are swapped in and out before the online graph exists
            momentum = self.momentum_forward(z_t, t, emb.detach())
        self.store.reset()
        self.store.token_index = positions
        pred = comps.unet(z_t, t, emb).sample
        target = noise if comps.prediction_type == "epsilon" else comps.scheduler.get_velocity(z0, noise, t.cpu())
        lat_mask = downsample_mask(masks.to(self.device), self.latent_size)  # nearest: stays binary
        per = masked_denoising_loss(pred, target, lat_mask, "paper", per_sample=True)  # (B,)
        side = min(m.shape[2] for m in self.store.maps.values())  # one size ("paper": the 16x16 layers already)
        maps = stack_token_maps(self.store, side)  # (L, B, heads, S, S, K)
        own_maps = torch.stack([maps[:, j, ..., owner[j]] for j in range(b)], dim=1)  # each image's own token
        attn = cross_attention_loss(own_maps, lat_mask, per_sample=True)  # (B,)
        self.last = dict(clean=clean, images=images, masks=masks, owner=owner, index=index, weight=w, t=t,
                         prompts=prompts, stage=stage, momentum=momentum, pred=pred)

        owner_t = torch.tensor(owner, device=per.device)
        n = len(self.sets)
        chosen, means = minmax_select(per, owner, n) if dsbal else (None, None)
        record: dict[str, Term] = {}
        terms: dict[str, float] = {"dmdeg_w": w if cfg.use_dmdeg else 0.0}
        for i, ts in enumerate(self.sets):
            sel = (owner_t == i).nonzero().flatten()
            if not len(sel):
                continue
            where = dict(concept=ts.name, index=[index[j] for j in sel.tolist()], mask=lat_mask[sel],
                         mask_kind="concept" if i == 0 else "component", tokens=(self.tokens[i],),
                         prompt=[prompts[j] for j in sel.tolist()], t=t[sel], t_range=(0, 1000))
            value = per[sel].mean()
            # warm-up / joint: the batch mean = sum over sets of (share of the batch) x set mean; DS-Bal: the max only
            weight = (1.0 if i == chosen else 0.0) if dsbal else len(sel) / b
            record[f"diffusion_{ts.name}"] = Term(value, weight, **where)
            record[f"attn_{ts.name}"] = Term(attn[sel].mean(), cfg.lambda_attn * len(sel) / b, **where)
            terms[f"loss_{ts.name}"] = value.item()
        if dsbal:
            others = (owner_t != chosen).nonzero().flatten()
            if len(others):
                pres = preservation_loss(pred[others], momentum[others])
                record["preservation"] = Term(pres, cfg.lambda_pres, concept="+".join(
                    self.sets[i].name for i in sorted({owner[j] for j in others.tolist()})),
                    index=[index[j] for j in others.tolist()], mask_kind="none", t=t[others])
                terms["loss_pres"] = pres.item()
            terms["chosen"] = float(chosen)
        loss = sum(term.weight * term.value for term in record.values())
        terms["loss_attn"] = attn.mean().item()
        terms["loss"] = loss.item()
        task = f"ds_bal:{self.sets[chosen].name}" if dsbal else stage
        return StepOutput(loss, terms, task, record)

    @torch.no_grad()
    def momentum_forward(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The momentum branch's output: the EMA adapter swapped into the same frozen U-Net, no graph, no capture."""
        self.store.active = False
        try:
            with self.ema.swapped():
                return self.comps.unet(z_t, t, emb).sample
        finally:
            self.store.active = True

    @torch.no_grad()
    def after_optimizer_step(self, phase: str, lr: float) -> None:
        """The momentum branch follows the online adapter after every optimizer step (first update: a copy)."""
        if self.cfg.use_dsbal and self.ema is not None:
            self.ema.update()

    # ------------------------------------------------------------------ measurement
    @torch.no_grad()
    def set_losses(self, draws: int = 4, seed: int = 1234) -> list[float]:
        """Each set's mean masked diffusion loss on its clean images (no DM-Deg, no augmentation) over ``draws``
        fixed (noise, timestep) draws: an independent measure of how well each concept/component is learned."""
        g = torch.Generator().manual_seed(seed)
        out = []
        self.store.active = False
        try:
            for i, ts in enumerate(self.sets):
                images, masks = ts.images.images.to(self.device), ts.masks.to(self.device)
                latents = self.comps.vae.encode(images).latent_dist.mean * self.comps.vae.config.scaling_factor
                emb, _ = encode_prompt(self.comps, [PROMPT.format(self.tokens[i])] * len(ts), self.token_ids, self.device)
                lat_mask = downsample_mask(masks, self.latent_size)
                vals = []
                for _ in range(draws):
                    noise = torch.randn(latents.shape, generator=g)
                    t = torch.randint(0, 1000, (len(ts),), generator=g)
                    z_t = self.comps.scheduler.add_noise(latents, noise, t)
                    pred = self.comps.unet(z_t, t, emb).sample
                    target = noise if self.comps.prediction_type == "epsilon" else \
                        self.comps.scheduler.get_velocity(latents, noise, t)
                    vals.append(masked_denoising_loss(pred, target, lat_mask).item())
                out.append(sum(vals) / len(vals))
        finally:
            self.store.active = True
        return out

    # ------------------------------------------------------------------ state, samples, outputs
    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = {"embedding.rows": self.embedding.rows.detach().clone()}
        if getattr(self.comps.unet, "peft_config", None):
            state.update({f"unet.{k}": v for k, v in get_peft_model_state_dict(self.comps.unet).items()})
        if self.ema is not None and self.ema.updates:
            state.update(self.ema.state_dict("ema."))
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        with torch.no_grad():
            self.embedding.rows.copy_(state["embedding.rows"])
        sub = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if sub and getattr(self.comps.unet, "peft_config", None):
            set_peft_model_state_dict(self.comps.unet, sub)
        if self.ema is not None:
            self.ema.load_state_dict(state, "ema.")

    def sample_prompt(self) -> str:
        return self.cfg.sample_prompt.format(**{f"v{i}": tok for i, tok in enumerate(self.tokens)})

    @torch.no_grad()
    def sample(self, run: RunDir, step: int, n: int = 2) -> None:
        from ...training.sampling import image_grid

        pipe = self.comps.pipeline()
        self.store.active = False
        try:
            g = torch.Generator().manual_seed(self.cfg.seed)
            images = pipe(self.sample_prompt(), num_images_per_prompt=n, num_inference_steps=self.cfg.sample_steps,
                          height=self.cfg.resolution, width=self.cfg.resolution, generator=g,
                          guidance_scale=7.5).images
        finally:
            self.store.active = True
        grid = image_grid(images)
        atomic_write(run.samples / f"step-{step:06d}.png", lambda p: grid.save(p, format="PNG"))

    def finalize(self, run: RunDir) -> None:
        from ...training.export import export_a1111, save_embeddings, save_lora

        self.sample(run, self.cfg.total_steps)
        save_embeddings(run.path, self.tokens, token_vectors(self.comps.text_encoder, self.token_ids))
        if getattr(self.comps.unet, "peft_config", None):
            save_lora(run.path, self.comps.unet)
        export_a1111(run.path)
