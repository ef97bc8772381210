"""MagicTailor's equations one by one (losses/tailor.py, training/ema.py): DM-Deg, its schedule, the
cross-attention loss, DS-Bal's min-max selection and preservation term, the adapter-only EMA."""

from __future__ import annotations

import pytest
import torch

from magicstudio.losses import (cross_attention_loss, degradation_weight, masked_degradation, masked_denoising_loss,
                                minmax_select, per_concept_mean, preservation_loss)
from magicstudio.training.ema import AdapterEMA


def _images_and_mask(seed=0, b=3, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    x[0, 0, 0, 0] = -0.0  # a negative zero inside the mask must survive bit for bit
    m = (torch.rand(b, 1, size, size, generator=g) > 0.5).float()
    m[0, 0, 0, 0] = 1
    return x, m


def test_dmdeg_leaves_in_mask_pixels_bit_identical_and_perturbs_only_outside():
    x, m = _images_and_mask()
    out = masked_degradation(x, m, 0.5, torch.Generator().manual_seed(1))
    inside = m.expand_as(x).bool()
    assert torch.equal(out[inside].view(torch.int32), x[inside].view(torch.int32))  # bit for bit, -0.0 included
    # outside: exactly clamp(x + w * n) with the generator's N(0, 1) draw
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    expect = (x + 0.5 * noise).clamp(-1, 1)
    assert torch.equal(out[~inside], expect[~inside])
    assert (out[~inside] != x[~inside]).float().mean() > 0.99


def test_dmdeg_clamps_to_the_image_range():
    x, m = _images_and_mask()
    out = masked_degradation(x, m, 10.0, torch.Generator().manual_seed(2))
    assert out.min() == -1 and out.max() == 1
    outside = ~m.expand_as(x).bool()
    assert ((out[outside].abs() == 1).float().mean()) > 0.8  # strong noise saturates outside


def test_dmdeg_weight_zero_changes_nothing_and_mask_size_is_checked():
    x, m = _images_and_mask()
    assert torch.equal(masked_degradation(x, m, 0.0, torch.Generator().manual_seed(3)), x)
    with pytest.raises(ValueError, match="image size"):
        masked_degradation(x, m[..., :16, :16], 0.5)


def test_dmdeg_schedule_follows_the_paper():
    T = 500
    ws = [degradation_weight(s, T) for s in range(T)]
    assert ws[0] == pytest.approx(0.5, abs=1e-12)  # w(0) = 0.5 (1 - (1/500)^32)
    assert ws[-1] == 0.0  # w(T - 1) = 0 exactly
    assert ws[299] == pytest.approx(0.5 * (1 - (300 / 500) ** 32), rel=1e-12)
    assert ws[479] == pytest.approx(0.5 * (1 - (480 / 500) ** 32), rel=1e-12)  # ~0.36: the decay is late
    assert all(a >= b for a, b in zip(ws, ws[1:]))
    assert degradation_weight(0, T, alpha=0.3, gamma=1) == pytest.approx(0.3 * (1 - 1 / T))
    assert all(degradation_weight(s, T, dynamic=False) == 0.5 for s in (0, 250, 499))  # the fixed ablation


def test_cross_attention_loss_is_zero_for_a_map_proportional_to_its_mask():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).float()
    scale = torch.rand(3, 1, 4, 1, 1, generator=g) + 0.1  # per layer and head, proportional everywhere
    maps = scale * mask[None, :, None, 0]  # (L=3, B=2, heads=4, 8, 8)
    assert cross_attention_loss(maps, mask).item() == pytest.approx(0.0, abs=1e-12)
    # a uniform map: A / max(A) = 1 everywhere, so the loss is the fraction of the map outside the mask
    uniform = torch.full_like(maps, 0.01)
    per = cross_attention_loss(uniform, mask, per_sample=True)
    assert torch.allclose(per, 1 - mask.mean(dim=(1, 2, 3)))
    # the mask is resized to the map (nearest): a map proportional to the 4x4 nearest mask gives 0 at 4x4
    big = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    small = torch.nn.functional.interpolate(big, size=(4, 4), mode="nearest")
    assert cross_attention_loss(small[None, :, None, 0] * 0.3, big).item() == pytest.approx(0.0, abs=1e-12)


def test_cross_attention_loss_divides_by_the_max_and_penalises_inside_and_outside():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    maps = torch.zeros(1, 1, 1, 4, 4)
    maps[..., 0, 0] = 0.5  # one peak inside; the rest of the mask region unattended
    maps[..., 3, 3] = 0.25  # some mass outside
    # A / max: 1 at (0,0), 0.5 at (3,3): squared errors: 7 cells inside at 1, 1 cell outside at 0.25
    assert cross_attention_loss(maps, mask).item() == pytest.approx((7 * 1 + 0.25) / 16)


def test_minmax_picks_the_largest_per_concept_mean_with_unequal_counts():
    per = torch.tensor([0.1, 0.1, 2.9, 1.2, 1.2])  # concept 0: 3 images (mean 1.03, holds the largest sample)
    owner = [0, 0, 0, 1, 1]  # concept 1: 2 images (mean 1.2): the sum or the largest sample would pick 0
    chosen, means = minmax_select(per, owner, 2)
    assert chosen == 1
    assert torch.allclose(means, torch.tensor([3.1 / 3, 1.2]))
    # order of the batch does not matter, and a concept without samples is never chosen
    chosen2, means2 = minmax_select(per.flip(0), owner[::-1], 3)
    assert chosen2 == 1 and means2[2] == float("-inf")
    assert torch.allclose(per_concept_mean(torch.tensor([4.0, 1.0, 1.0]), [1, 0, 0], 2), torch.tensor([1.0, 4.0]))


def test_minmax_gradient_reaches_only_the_chosen_concepts_samples():
    per = torch.tensor([0.1, 0.1, 2.9, 1.2, 1.2], requires_grad=True)
    chosen, means = minmax_select(per, [0, 0, 0, 1, 1], 2)
    means[chosen].backward()
    assert torch.equal(per.grad, torch.tensor([0, 0, 0, 0.5, 0.5]))


def test_preservation_is_zero_for_equal_branches_and_its_gradient_reaches_only_the_online_one():
    g = torch.Generator().manual_seed(0)
    online = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    momentum = online.detach().clone().requires_grad_(True)
    assert preservation_loss(online, momentum).item() == 0.0
    other = (momentum.detach() + 0.5).requires_grad_(True)
    loss = preservation_loss(online, other)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert other.grad is None  # the momentum branch is a constant
    assert torch.allclose(online.grad, 2 * (online - other).detach() / online.numel())


def test_masked_diffusion_loss_per_sample_averages_to_the_batch_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    per = masked_denoising_loss(pred, target, mask, per_sample=True)
    assert per.shape == (3,)
    assert per.mean().item() == pytest.approx(masked_denoising_loss(pred, target, mask).item(), rel=1e-6)
    expect = ((pred - target) * mask).pow(2).mean(dim=(1, 2, 3))  # not normalised by the mask area
    assert torch.allclose(per, expect)


def test_adapter_ema_is_the_closed_form_average_and_swaps_back_bit_identically():
    d = 0.9
    p = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA({"p": p}, decay=d)
    values = [torch.tensor([1.0, -2.0, 3.0]) * (k + 1) + k ** 2 for k in range(6)]
    for v in values:
        with torch.no_grad():
            p.copy_(v)
        ema.update()
    k = len(values)
    closed = d ** (k - 1) * values[0] + sum((1 - d) * d ** (k - 1 - j) * values[j] for j in range(1, k))
    assert torch.allclose(ema.shadow["p"], closed, atol=1e-5)
    online = p.detach().clone()
    with ema.swapped():
        assert torch.equal(p.detach(), ema.shadow["p"])
    assert torch.equal(p.detach(), online)
    # a checkpoint round trip keeps the average and the update count (first update = copy only once)
    other = AdapterEMA({"p": p}, decay=d)
    other.load_state_dict(ema.state_dict())
    assert other.updates == k and torch.equal(other.shadow["p"], ema.shadow["p"])


def test_adapter_ema_first_update_is_a_copy_and_a_swap_inside_a_graph_is_refused():
    lin = torch.nn.Linear(3, 1)
    ema = AdapterEMA(dict(lin.named_parameters()), decay=0.99)
    ema.update()
    assert all(torch.equal(ema.shadow[n], p.detach()) for n, p in lin.named_parameters())
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], lin.weight.detach() - 0.99)
    x = torch.randn(2, 3, requires_grad=True)
    out = (lin(x) ** 2).sum()  # the graph saved the online weight
    with ema.swapped():
        pass
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
