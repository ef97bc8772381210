"""MagiCapture's mechanisms judged by independent measurements in the toy world (issue 13).

Each test trains the real ``MagiCapture.micro_step`` (a few phase-2 steps on the composed task alone, where every
mechanism acts; the module's task list is narrowed with ``monkeypatch``) against a control that differs in one
setting, then measures the quantity the mechanism exists for with something the loss never saw:

- Attention Refocusing (Eq. 8): the ``<v1>`` / ``<v2>`` cross-attention on **held-out** pictures (not trained on),
  against the **generator's** face masks of those pictures, never the mask the loss was given;
- the identity loss (Eq. 7): the toy-CSIM network (``identity``, a different network from the loss's ``face``
  network) on **decoded** Tweedie estimates, not the loss value;
- the composed task (Eq. 6): the decoded output under the composed prompt moving toward the reference image.

Measured on the lock (2026-12-02, 15 steps, lr 1e-2, seed 0; the figures are in each test's docstring).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magicstudio.data import toyworld as world
from magicstudio.training.concepts import load_concept

STEPS, LR = 15, 1e-2
MARGIN_V1 = 0.02  # <v1>'s face share: 0.158 with AR vs 0.117 without; 0.110 with the masks inverted
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_base():
    from magicstudio.models import load_base

    return load_base("toyworld")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Held-out pair 0: (source portraits, reference portraits, source folder, reference folder)."""
    root = tmp_path_factory.mktemp("toy")
    src, ref = world.concept_set("identity", 0, n=4), world.concept_set("style", 0, n=4)
    return (src, ref, world.write_concept_set(src, root / "source", "source"),
            world.write_concept_set(ref, root / "reference", "reference"))


def trained(toy_base, pair, monkeypatch, tasks=("composed",), steps=STEPS, **overrides):
    """MagiCapture after ``steps`` optimizer steps of phase 2 on ``tasks`` (the real micro-step, AdamW at LR)."""
    from magicstudio.methods.magicapture import make_config
    from magicstudio.methods.magicapture import train as T
    from magicstudio.models.face_encoder import load_face_encoder

    monkeypatch.setattr(T, "TASKS_LORA", tasks)
    settings = dict(model="toyworld", resolution=world.SIZE, face_encoder="toyworld", hflip=False, color_jitter=0.0,
                    ar_layers="res:2", decode_precision="fp32", use_ar=False, use_id=False)
    cfg = make_config("smoke", **(settings | overrides))
    m = T.MagiCapture(cfg, copy.deepcopy(toy_base), load_concept(pair[2], world.SIZE),
                      load_concept(pair[3], world.SIZE), load_face_encoder("toyworld"))
    groups = m._setup_lora()
    for g in groups:
        g["lr"] = LR
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for _ in range(steps):
        m.micro_step("lora", m.cfg.ti_steps).loss.backward()
        opt.step()
        opt.zero_grad()
    return m


def tensor(p) -> torch.Tensor:
    return torch.from_numpy(p.image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def face_of(p) -> torch.Tensor:
    """The generator's face mask of picture ``p`` (1, 1, 64, 64) in {0, 1}."""
    return torch.from_numpy((p.masks["face"] > 0).astype(np.float32))[None, None]


@torch.no_grad()
def denoise(m, pictures, timesteps, prompt=None):
    """For each picture and t (fixed noise): the UNet's pass under the composed prompt. Yields
    (picture, t, token maps (L, heads, S, S, K), decoded Tweedie estimate (1, 3, 64, 64))."""
    from magicstudio.attention.capture import stack_token_maps
    from magicstudio.losses import tweedie_x0

    emb, positions = m._encode_prompt(prompt or m.composed_prompt())
    for k, p in enumerate(pictures):
        z0 = m._encode(tensor(p))
        for t in timesteps:
            tt = torch.tensor([t])
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1000 * k + t))
            z_t = m.comps.scheduler.add_noise(z0, noise, tt)
            m.store.reset()
            m.store.token_index = positions
            pred = m.comps.unet(z_t, tt, emb).sample
            maps = stack_token_maps(m.store)[:, 0]
            yield p, t, maps, m._decode(tweedie_x0(z_t, pred, m.alphas_cumprod, tt)).clamp(-1, 1)


def face_share(m, pictures, prompt: str, k: int) -> float:
    """Share of token ``k``'s raw attention mass (mean over layers and heads) inside each picture's generator face
    mask (area-downsampled to the map), under ``prompt``, at t = 100, 300, 500 with fixed noise."""
    shares = []
    for p, _, maps, _ in denoise(m, pictures, (100, 300, 500), prompt):
        raw = maps.mean(dim=(0, 1))[..., k]  # (S, S)
        face = F.adaptive_avg_pool2d(face_of(p), raw.shape[0])[0, 0]
        shares.append(float((raw * face).sum() / raw.sum()))
    return float(np.mean(shares))


def shares(m) -> tuple[float, float]:
    """(<v1>'s share on the face of 4 unseen pictures of the person, under the source prompt;
    <v2>'s share on the face of 4 unseen pictures in the style, under the reference prompt)."""
    from magicstudio.training import prompts as P

    cfg = m.cfg
    person = world.concept_set("identity", 0, n=4, seed=1)
    styled = world.concept_set("style", 0, n=4, seed=1)
    return (face_share(m, person, P.SOURCE_TEMPLATES[0].format(v1=cfg.v1, v2=cfg.v2), 0),
            face_share(m, styled, P.REFERENCE_TEMPLATES[0].format(v1=cfg.v1, v2=cfg.v2), 1))


def test_attention_refocusing_on_the_true_masks_of_held_out_pictures(toy_base, pair, monkeypatch):
    """Eq. 8 judged on pictures never trained on (a second draw of the held-out person and style), with their
    generator masks: <v1>'s attention moves onto the face, <v2>'s off it, AR vs the same training without AR
    (source and reference tasks: each token alone in its prompt). Measured (15 steps): <v1> 0.158 with AR vs 0.117
    without, 0.110 with every AR mask inverted (the test fails then). <v2>'s face share is printed, not asserted:
    it does not fall within this budget (0.127 with AR vs 0.109 without; 0.097 inverted), since 15 steps mostly
    sharpen its map (its min-max scaled attention inside the face does fall, 0.50 -> 0.28). The <v1>/<v2> swap in
    the composed task is caught at the step (tests/test_step_wiring.py compares each AR mask with the generator's
    face mask)."""
    tasks = ("source", "reference")
    off = shares(trained(toy_base, pair, monkeypatch, tasks=tasks, use_ar=False))
    on = shares(trained(toy_base, pair, monkeypatch, tasks=tasks, use_ar=True, lambda_attn=20.0))
    print(f"face share of <v1>, <v2>: without AR {off}, with AR {on}")
    assert on[0] > off[0] + MARGIN_V1, (on, off)


def csim(m, source, reference) -> float:
    """Toy-CSIM (the ``identity`` network, not the loss's ``face`` network) of the decoded composed-prompt
    estimates of the reference pictures with the source identity (mean embedding of the source pictures)."""
    from magicstudio.models.toyworld import ToyEmbedder, load_toy_encoders

    ident = ToyEmbedder("identity", load_toy_encoders()["identity"])
    target = F.normalize(ident.image_embeddings([p.image for p in source]).mean(0), dim=0)
    images = torch.cat([x for *_, x in denoise(m, reference, (400, 700))])
    return float(F.cosine_similarity(ident.image_embeddings(images), target[None]).mean())


def test_identity_loss_raises_the_independent_face_similarity_of_decoded_images(toy_base, pair, monkeypatch):
    """Eq. 7 judged by another network on decoded images: training the composed task with the identity loss
    (lambda_id 5) vs without it. Measured: toy-CSIM 0.257 with vs 0.150 without (0.171 before training)."""
    source, reference = pair[0], pair[1]
    without = csim(trained(toy_base, pair, monkeypatch), source, reference)
    with_id = csim(trained(toy_base, pair, monkeypatch, use_id=True, lambda_id=5.0), source, reference)
    print(f"toy-CSIM without L_id {without:.3f}, with {with_id:.3f}")
    assert with_id > without + 0.05


def reference_distance(m, reference) -> float:
    """Mean squared pixel distance, outside the generator's face mask, between the decoded composed-prompt
    estimate of each reference picture (noised to t = 700, mostly noise) and that reference picture."""
    d = [float((((x - tensor(p)) ** 2) * (1 - face_of(p))).sum() / (3 * (1 - face_of(p)).sum()))
         for p, _, _, x in denoise(m, reference, (700,))]
    return float(np.mean(d))


def test_composed_task_moves_the_output_toward_the_reference(toy_base, pair, monkeypatch):
    """Eq. 6 (the reference image as pseudo-label under the composed prompt): the same number of steps on the
    composed task vs on the source task only (Eq. 4, which never sees a reference picture)."""
    reference = pair[1]
    source_only = reference_distance(trained(toy_base, pair, monkeypatch, tasks=("source",)), reference)
    composed = reference_distance(trained(toy_base, pair, monkeypatch), reference)
    print(f"distance to the reference: source task only {source_only:.4f}, composed task {composed:.4f}")
    assert composed < 0.93 * source_only  # measured 0.0765 vs 0.0843; with the source image as pseudo-label 0.0799
