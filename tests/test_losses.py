"""Each loss against a hand computation, and in ways that fail if its mask, sign, scale or target is wrong."""

import math

import pytest
import torch

from magicstudio.losses import (attention_outside, attention_refocusing_loss, attention_spill, identity_loss,
                                masked_denoising_loss, minmax_scale, tweedie_x0)


def _pair():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 4, 4, generator=g)
    target = torch.randn(2, 4, 4, 4, generator=g) + 3.0  # large values outside the mask would show
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1
    return pred, target, mask


def test_masked_loss_matches_hand_computation():
    pred, target, mask = _pair()
    expected = sum(((pred[b, c, i, j] - target[b, c, i, j]) ** 2).item()
                   for b in range(2) for c in range(4) for i in range(2) for j in range(2)) / pred.numel()
    assert masked_denoising_loss(pred, target, mask) == pytest.approx(expected, rel=1e-6)


def test_masked_loss_fails_for_one_sided_or_inverted_mask():
    pred, target, mask = _pair()
    good = masked_denoising_loss(pred, target, mask)
    one_sided = torch.nn.functional.mse_loss(pred * mask, target)  # mask on the prediction only
    inverted = masked_denoising_loss(pred, target, 1 - mask)
    assert not torch.isclose(good, one_sided) and not torch.isclose(good, inverted)
    # values outside the mask do not matter at all; inside they do
    moved = target.clone()
    moved[:, :, 3, 3] += 100
    assert masked_denoising_loss(pred, moved, mask) == good
    moved[:, :, 0, 0] += 1
    assert masked_denoising_loss(pred, moved, mask) > good


def test_masked_loss_rejects_mask_not_at_latent_size():
    pred, target, _ = _pair()
    with pytest.raises(ValueError):
        masked_denoising_loss(pred, target, torch.ones(2, 1, 32, 32))


def test_official_masked_loss_hand_computation():
    pred, target, mask = _pair()
    soft = (mask + 0.01) / 1.01
    per = ((pred - target) * soft).pow(2).mean(dim=(1, 2, 3))
    expected = (per * (16 / 4)).mean()
    assert masked_denoising_loss(pred, target, mask, mode="official") == pytest.approx(expected.item(), rel=1e-6)


def test_latent_mask_downsampling_is_nearest_blockwise():
    from magicstudio.data.masks import downsample_mask

    img_mask = torch.zeros(1, 1, 64, 64)
    img_mask[..., :32, 40:] = 1  # a block covering latent cells (0..3, 5..7) at 8x downscale
    lat = downsample_mask(img_mask, 8)
    expected = torch.zeros(8, 8)
    expected[:4, 5:] = 1
    assert torch.equal(lat.reshape(8, 8).float(), expected)


def test_minmax_scale_is_zero_one_with_constant_min_max():
    a = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]]], requires_grad=True)
    s = minmax_scale(a)
    assert torch.allclose(s, torch.tensor([[[[0.0, 0.5], [0.25, 1.0]]]]), atol=1e-6)
    s.sum().backward()
    assert torch.allclose(a.grad, torch.full_like(a, 1 / 4), atol=1e-6)  # min and max carry no gradient


def _ar_inputs():
    # 1 layer, 1 sample, 1 head, 2x2 map; mask keeps the top-left pixel
    maps = torch.tensor([0.1, 0.4, 0.2, 0.5]).view(1, 1, 1, 2, 2).requires_grad_(True)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    return maps, mask


def test_attention_refocusing_hand_computation():
    maps, mask = _ar_inputs()
    scaled = (torch.tensor([0.1, 0.4, 0.2, 0.5]) - 0.1) / 0.4  # [0, .75, .25, 1]
    expected = (scaled[1] ** 2 + scaled[2] ** 2 + scaled[3] ** 2) / 4
    assert attention_refocusing_loss(maps, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_refocusing_never_touches_in_mask_values_and_pushes_outside_down():
    maps, mask = _ar_inputs()
    attention_refocusing_loss(maps, mask).backward()
    g = maps.grad.view(2, 2)
    assert g[0, 0] == 0  # in-mask value: free (the paper's "optimal values vary")
    assert (g.flatten()[1:] >= 0).all() and g.flatten()[1:].sum() > 0  # descent lowers outside attention
    # inverting the mask gives a different loss; changing an in-mask (non-extreme) value changes nothing
    assert attention_refocusing_loss(maps, 1 - mask).item() != pytest.approx(attention_refocusing_loss(maps, mask).item())
    m2 = torch.tensor([0.3, 0.1, 0.2, 0.5]).view(1, 1, 1, 2, 2)
    m3 = m2.clone()
    m3[..., 0, 0] = 0.35  # inside the mask, min and max unchanged
    assert attention_refocusing_loss(m2, mask) == attention_refocusing_loss(m3, mask)


def test_attention_refocusing_descent_lowers_outside_attention():
    logits = torch.randn(1, 1, 1, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    opt = torch.optim.Adam([logits], lr=0.1)

    def probs():
        return torch.softmax(logits.flatten(), 0).view_as(logits)

    before = attention_spill(probs().detach(), mask).item()
    for _ in range(100):
        opt.zero_grad()
        attention_refocusing_loss(probs(), mask).backward()
        opt.step()
    assert attention_spill(probs().detach(), mask).item() < 0.5 * before
    assert attention_outside(probs().detach(), mask).item() < 0.2


def test_spill_and_outside_figures():
    maps = torch.zeros(1, 1, 1, 2, 2)
    maps[..., 0, 0] = 3.0
    maps[..., 1, 1] = 1.0
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert attention_spill(maps, mask).item() == pytest.approx(0.25)
    assert attention_outside(maps, mask).item() == pytest.approx((0 + 0 + 1 / 3) / 3, rel=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_tweedie_recovers_x0_exactly_with_true_noise(prediction):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 400, 799])
    zt = sched.add_noise(z0, eps, t)
    out = eps if prediction == "epsilon" else sched.get_velocity(z0, eps, t)
    assert torch.allclose(tweedie_x0(zt, out, sched.alphas_cumprod, t, prediction), z0, atol=1e-4)
    wrong = tweedie_x0(zt, -out, sched.alphas_cumprod, t, prediction)  # a sign error would not recover it
    assert not torch.allclose(wrong, z0, atol=1e-2)


def test_identity_loss_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ref = torch.tensor([1.0, 0.0])
    assert identity_loss(a[:1], ref).item() == pytest.approx(0.0, abs=1e-6)
    assert identity_loss(a[1:2], ref).item() == pytest.approx(1.0)
    assert identity_loss(a[2:3], ref).item() == pytest.approx(2.0)
    assert identity_loss(a, ref).item() == pytest.approx(1.0)
    v = torch.tensor([[0.6, 0.8]], requires_grad=True)
    identity_loss(v, ref).backward()
    assert v.grad[0, 0] < 0  # descent moves the embedding towards the reference
    assert math.isfinite(v.grad.sum().item())
