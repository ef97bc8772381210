"""MagiCapture's general-object losses (supplement Eq. 11): hand computations, what each term is blind to, and
that each one moves the quantity it exists for; then the object-mode composed task in training."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from magicstudio.losses import key_self_similarity, patch_contrastive_loss, self_similarity_loss, style_cls_loss
from magicstudio.models.dino import load_dino_features


def test_self_similarity_loss_by_hand():
    src = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    gen = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    s_src = torch.tensor([[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]])
    s_gen = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert torch.allclose(key_self_similarity(src)[0], s_src, atol=1e-6)
    expected = (s_gen - s_src).pow(2).sum() / 9  # the authors' MSE over the 3x3 map (METHODS.md), not the norm
    assert torch.allclose(self_similarity_loss(gen, src), expected, atol=1e-6)
    # zero for the same structure, whatever the keys' scale; the source side gets no gradient
    assert self_similarity_loss(src * 3.0, src).item() == pytest.approx(0.0, abs=1e-6)
    g, s = gen.clone().requires_grad_(True), src.clone().requires_grad_(True)
    self_similarity_loss(g, s).backward()
    assert g.grad.abs().sum() > 0 and s.grad is None


def test_patch_contrastive_loss_by_hand_and_positive_is_same_position():
    torch.manual_seed(0)
    src = torch.randn(2, 5, 8)
    gen = src + 0.1 * torch.randn(2, 5, 8)
    tau = 0.07
    q, k = F.normalize(gen, dim=-1), F.normalize(src, dim=-1)
    logits = q @ k.transpose(1, 2) / tau
    expected = -torch.log_softmax(logits, dim=-1).diagonal(dim1=1, dim2=2).mean()
    assert torch.allclose(patch_contrastive_loss(gen, src, tau, num_patches=None), expected, atol=1e-5)
    # the positive is the SAME position: shuffling the generated patches makes it much worse
    shuffled = gen[:, torch.tensor([1, 2, 3, 4, 0])]
    assert patch_contrastive_loss(shuffled, src, tau, None) > expected + 1.0
    # sampled positions: the same value when every position is sampled
    assert torch.allclose(patch_contrastive_loss(gen, src, tau, num_patches=5), expected, atol=1e-5)
    g = gen.clone().requires_grad_(True)
    s = src.clone().requires_grad_(True)
    patch_contrastive_loss(g, s, tau, None).backward()
    assert s.grad is None and g.grad.abs().sum() > 0


def test_style_cls_loss_by_hand():
    gen = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # the authors' MSE over every feature (METHODS.md): (9 + 16 + 1 + 0) / 4, not the mean L2 norm (5 + 1) / 2
    assert style_cls_loss(gen, ref).item() == pytest.approx((9.0 + 16.0 + 1.0) / 4)
    assert style_cls_loss(ref, ref).item() == 0.0
    g = gen.clone().requires_grad_(True)
    r = ref.clone().requires_grad_(True)
    style_cls_loss(g, r).backward()
    assert r.grad is None and g.grad.abs().sum() > 0


def test_each_term_moves_its_quantity_through_dino():
    """Optimising an image through the (tiny) DINO ViT: L_style pulls its [CLS] to the reference's, L_ssim + L_contra
    pull its key structure to the source's."""
    dino = load_dino_features("tiny")
    torch.manual_seed(1)
    src, ref = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        cls_ref, _ = dino(ref)
        _, keys_src = dino(src)
    img = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    opt = torch.optim.Adam([img], lr=0.05)
    with torch.no_grad():
        cls0, keys0 = dino(img)
    before = (style_cls_loss(cls0, cls_ref).item(), self_similarity_loss(keys0, keys_src).item())
    for _ in range(40):
        cls_g, keys_g = dino(img)
        loss = style_cls_loss(cls_g, cls_ref) + self_similarity_loss(keys_g, keys_src) + patch_contrastive_loss(keys_g, keys_src, num_patches=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        cls1, keys1 = dino(img)
    after = (style_cls_loss(cls1, cls_ref).item(), self_similarity_loss(keys1, keys_src).item())
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1], (before, after)


def test_missing_dino_is_one_line(monkeypatch, tmp_path):
    from magicstudio.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="DINO"):
        load_dino_features(str(tmp_path / "nope"))


def test_object_mode_composed_task_trains_eq11(tiny, demo_sets, tmp_path, caplog):
    from magicstudio.methods.magicapture import make_config, run_training

    common = dict(mode="object", object_class="thing", ti_steps=1, lora_steps=12, resolution=64, sample_steps=2,
                  checkpoint_every=50)
    run = run_training(demo_sets[0], demo_sets[1], tmp_path / "obj", make_config("smoke", **common), progress=False)
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    composed = [r for r in records if r["task"] == "composed"]
    assert composed and all({"loss_ssim", "loss_contra", "loss_style"} <= set(r) for r in composed)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert not any("attn_spill_v1" in r for r in composed)  # no spatial AR target for the object on a reference
    # without a DINO model: one warning, and the composed task falls back to the pseudo-label reconstruction
    with caplog.at_level(logging.WARNING):
        run2 = run_training(demo_sets[0], demo_sets[1], tmp_path / "obj2",
                            make_config("smoke", **common, dino_model=""), progress=False)
    assert sum("Eq. 11" in r.getMessage() for r in caplog.records) == 1
    records = [json.loads(x) for x in (run2.path / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_ssim" not in r for r in records)
