"""MagicTailor at the training step on the tiny model: which mask reaches which image, DM-Deg in both stages,
DS-Bal's chosen term and its momentum branch, the learning-rate schedule of the presets, what trains."""

from __future__ import annotations

import copy

import pytest
import torch

from magicstudio.data.masks import downsample_mask
from magicstudio.losses import degradation_weight
from magicstudio.methods.magictailor import make_config
from magicstudio.methods.magictailor.train import MagicTailor
from tailor_world import training_sets

FAST = dict(resolution=64, warmup_steps=3, dsbal_steps=3, sample_steps=2, checkpoint_every=3)


def _method(tiny, sets=None, **kw):
    cfg = make_config("smoke", **{**FAST, **kw})
    return MagicTailor(cfg, tiny, sets or training_sets(cfg.resolution))


def _step(m, step):
    """One optimizer step by hand (as the loop does): micro-step, backward, AdamW, the EMA update."""
    out = m.micro_step("magictailor", step)
    out.loss.backward()
    m._opt.step()
    m._opt.zero_grad(set_to_none=True)
    m.after_optimizer_step("magictailor", 0.0)
    return out


def _ready(m):
    m._opt = torch.optim.AdamW(m._setup(), weight_decay=m.cfg.weight_decay)
    return m


def test_each_image_gets_its_own_mask_and_token(tiny):
    m = _ready(_method(tiny))
    out = m.micro_step("magictailor", 0)
    last = m.last
    assert last["owner"] == [0, 0, 0, 1, 1] and last["index"] == [0, 1, 2, 0, 1]
    # the images encode their mask (inside bright, outside grey): after flip and jitter they still agree
    for j, (i, k) in enumerate(zip(last["owner"], last["index"])):
        truth = m.sets[i].masks[k]
        flipped = not torch.equal(last["masks"][j], truth)
        assert torch.equal(last["masks"][j], truth.flip(-1) if flipped else truth)
        img = m.sets[i].images.images[k]
        assert torch.allclose(last["clean"][j].mean(0), (img.flip(-1) if flipped else img).mean(0), atol=0.25)
    lat = m.latent_size
    concept, comp = out.record["diffusion_concept"], out.record["diffusion_component_hair"]
    assert concept.mask_kind == "concept" and comp.mask_kind == "component"
    assert torch.equal(concept.mask, downsample_mask(last["masks"][:3], lat))
    assert torch.equal(comp.mask, downsample_mask(last["masks"][3:], lat))
    assert all(p == "A photo of <v0>" for p in concept.prompt) and all(p == "A photo of <v1>" for p in comp.prompt)
    assert concept.tokens == ("<v0>",) and comp.tokens == ("<v1>",)


def test_concept_mask_is_the_concept_without_the_component():
    sets = training_sets(64)
    c = sets[0]
    assert torch.equal(c.masks * c.hair, torch.zeros_like(c.masks))  # no hair pixel in the concept's mask
    assert c.masks.sum() > 0 and sets[1].masks.sum() > 0


@pytest.mark.parametrize("step", [0, 4])  # warm-up, DS-Bal
def test_dmdeg_perturbs_outside_the_mask_in_both_stages(tiny, step):
    m = _ready(_method(tiny))
    if step >= m.cfg.warmup_steps:
        m.ema.update()
    m.micro_step("magictailor", step)
    last = m.last
    assert last["stage"] == ("warmup" if step < 3 else "ds_bal")
    assert last["weight"] == degradation_weight(step, 6, 0.5, 32.0)
    inside = last["masks"].expand_as(last["clean"]).bool()
    assert torch.equal(last["images"][inside], last["clean"][inside])
    changed = (last["images"] != last["clean"])[~inside].float().mean()
    assert changed > 0.95


def test_without_dmdeg_the_images_are_clean(tiny):
    m = _ready(_method(tiny, use_dmdeg=False))
    out = m.micro_step("magictailor", 0)
    assert torch.equal(m.last["images"], m.last["clean"]) and out.terms["dmdeg_w"] == 0.0


def test_warmup_loss_is_the_masked_diffusion_plus_weighted_attention_over_all_images(tiny):
    m = _ready(_method(tiny))
    out = m.micro_step("magictailor", 0)
    r = out.record
    assert set(r) == {"diffusion_concept", "diffusion_component_hair", "attn_concept", "attn_component_hair"}
    assert r["diffusion_concept"].weight == pytest.approx(3 / 5) and r["diffusion_component_hair"].weight == pytest.approx(2 / 5)
    assert r["attn_concept"].weight == pytest.approx(0.01 * 3 / 5)
    total = sum(t.weight * t.value for t in r.values())
    assert torch.allclose(out.loss, total)


def test_dsbal_optimises_the_largest_set_and_preserves_the_others(tiny):
    m = _ready(_method(tiny))
    for s in range(3):
        _step(m, s)
    out = m.micro_step("magictailor", 3)
    r = out.record
    values = {k: r[f"diffusion_{k}"].value.item() for k in ("concept", "component_hair")}
    chosen = max(values, key=values.get)
    other = min(values, key=values.get)
    assert out.task == f"ds_bal:{chosen}"
    assert r[f"diffusion_{chosen}"].weight == 1.0 and r[f"diffusion_{other}"].weight == 0.0
    pres = r["preservation"]
    assert pres.weight == 0.2 and pres.concept == other
    sel = [j for j, o in enumerate(m.last["owner"]) if m.sets[o].name == other]
    expect = torch.nn.functional.mse_loss(m.last["pred"][sel].float(), m.last["momentum"][sel].float())
    assert torch.allclose(pres.value, expect)
    assert torch.allclose(out.loss, sum(t.weight * t.value for t in r.values()))
    # the gradient of the other set's diffusion term does not reach the weights: only its preservation term does
    grads = torch.autograd.grad(r[f"diffusion_{other}"].weight * r[f"diffusion_{other}"].value, m.embedding.rows,
                                retain_graph=True, allow_unused=True)[0]
    assert grads is None or torch.count_nonzero(grads) == 0
    g_pres = torch.autograd.grad(pres.value, m.embedding.rows, retain_graph=True)[0]
    assert torch.count_nonzero(g_pres) > 0


def test_momentum_branch_is_the_ema_adapter_on_the_same_unet(tiny, _tiny_master):
    m = _ready(_method(tiny, ema_decay=0.0))  # EMA = the online adapter: the branches must agree exactly
    for s in range(3):
        _step(m, s)
    out = m.micro_step("magictailor", 3)
    assert torch.equal(m.last["momentum"], m.last["pred"].detach())
    assert out.record["preservation"].value.item() == 0.0
    m2 = _ready(_method(copy.deepcopy(_tiny_master), ema_decay=0.99))
    for s in range(3):
        _step(m2, s)
    out2 = m2.micro_step("magictailor", 3)
    assert out2.record["preservation"].value.item() > 0  # the average lags the online weights
    # the online weights are back in place after the momentum pass
    online = {n: p.detach().clone() for n, p in m2.ema.params.items()}
    assert all(not torch.equal(online[n], m2.ema.shadow[n]) for n in list(online)[:3])


def test_ema_follows_every_optimizer_step_in_closed_form(tiny):
    m = _ready(_method(tiny, ema_decay=0.9, use_dmdeg=False))
    name = next(iter(m.ema.params))
    history = []
    for s in range(4):
        _step(m, s)
        history.append(m.ema.params[name].detach().clone())
    k = len(history)
    closed = 0.9 ** (k - 1) * history[0] + sum(0.1 * 0.9 ** (k - 1 - j) * history[j] for j in range(1, k))
    assert torch.allclose(m.ema.shadow[name], closed, atol=1e-6)
    assert m.ema.updates == 4


@pytest.mark.parametrize("preset, expect", [
    ("paper", [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]),
    ("official", [1.0, 1.0, 1.0, 0.1, 1.0, 1.0]),  # the authors' constant scheduler resets the DS-Bal lr
])
def test_learning_rate_factors_of_the_presets(tiny, preset, expect):
    from magicstudio.methods.magictailor import config as C

    m = _method(tiny, warmup_lr=1e-3, dsbal_lr=1e-4, **C.PRESETS[preset])
    assert [m.lr_factor(k) for k in range(6)] == pytest.approx(expect)
    n = m.n_images
    assert m.base_lr() == pytest.approx(1e-3 * (n if preset == "official" else 1))


def test_only_the_new_token_rows_and_the_lora_train(tiny):
    from magicstudio.training.lora import lora_module_names

    table = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    m = _ready(_method(tiny))
    rows = m.embedding.rows.detach().clone()
    for s in range(2):
        _step(m, s)
    assert torch.equal(m.embedding.base.weight[: table.shape[0]], table)
    assert not torch.equal(m.embedding.rows, rows)
    # LoRA exactly on to_q/k/v/out.0 (self and cross), proj_in, proj_out, ff.net.2; base weights untouched
    kinds = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if n.endswith("to_out.0") else n.rsplit(".", 1)[-1]
             for n in lora_module_names(m.comps.unet)}
    assert kinds == {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "2"}
    state = m.comps.unet.state_dict()
    for k, v in unet_before.items():
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(v, state[key]), k
    group_params = {id(p) for g in m._opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in m.comps.unet.parameters() if p.requires_grad} | {id(m.embedding.rows)}
    assert group_params == trainable
