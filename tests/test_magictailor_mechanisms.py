"""MagicTailor's mechanisms move the quantities they exist for, measured independently of the training losses.

DS-Bal: with one hard concept image (a fine texture) against four easy component images, joint training spends
four fifths of each step on the easy set; DS-Bal's min-max spends it on the set that lags, so at the end the gap
between the two sets' losses (measured on the clean images at fixed noise and timesteps) is smaller.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from magicstudio.attention.capture import stack_token_maps
from magicstudio.methods.magictailor import make_config
from magicstudio.methods.magictailor.train import PROMPT, MagicTailor
from magicstudio.training.personalize import encode_prompt
from tailor_world import training_sets


def _trained(master, sets, **kw):
    cfg = make_config("smoke", checkpoint_every=0, **kw)
    m = MagicTailor(cfg, copy.deepcopy(master), sets)
    opt = torch.optim.AdamW(m._setup(), weight_decay=cfg.weight_decay)
    for step in range(cfg.total_steps):
        m.micro_step("magictailor", step).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.after_optimizer_step("magictailor", 0.0)
    return m


def test_dsbal_narrows_the_gap_between_the_concept_and_the_component(_tiny_master):
    sets = lambda: training_sets(64, n_concept=1, n_component=4, seed=0, concept_texture=60.0)  # noqa: E731
    common = dict(resolution=64, warmup_steps=2, dsbal_steps=30, warmup_lr=3e-3, dsbal_lr=3e-3, use_dmdeg=False,
                  lambda_attn=0.0)
    bal = _trained(_tiny_master, sets(), **common)
    joint = _trained(_tiny_master, sets(), use_dsbal=False, **common)
    lb, lj = bal.set_losses(draws=4), joint.set_losses(draws=4)
    gap_bal, gap_joint = abs(lb[0] - lb[1]), abs(lj[0] - lj[1])
    assert lb[0] < lj[0]  # the lagging concept learned more
    assert gap_bal < gap_joint - 0.003, (lb, lj)


@torch.no_grad()
def hair_attention_share(m: MagicTailor, draws: int = 6) -> float:
    """<v0>'s share of its cross-attention mass on the concept images' hair (the component region there), on the
    clean images at fixed noise and timesteps."""
    c = m.sets[0]
    g = torch.Generator().manual_seed(99)
    vae = m.comps.vae
    latents = vae.encode(c.images.images).latent_dist.mean * vae.config.scaling_factor
    emb, pos = encode_prompt(m.comps, [PROMPT.format("<v0>")] * len(c), m.token_ids)
    shares = []
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (len(c),), generator=g)
        m.store.reset()
        m.store.token_index = pos
        m.comps.unet(m.comps.scheduler.add_noise(latents, noise, t), t, emb)
        maps = stack_token_maps(m.store)[..., 0].float().mean(dim=(0, 2))  # (B, S, S)
        hair = F.adaptive_avg_pool2d(c.hair, maps.shape[-1])[:, 0]
        shares.append(((maps * hair).sum((-2, -1)) / maps.sum((-2, -1))).mean().item())
    return sum(shares) / len(shares)
