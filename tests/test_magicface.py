"""MagicFace (arXiv:2408.07433): RSA / RBA processors, attention-based segmentation, sampler, CLI.

The processor tests compare against diffusers' own ``AttnProcessor2_0`` (bit for bit where the method must not
change anything) and against a naive joint softmax written out here (where it must).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from magicstudio.attention.capture import AttentionStore, restore_processors
from magicstudio.attention.magicface import MagicFaceProcessor, MagicFaceState, install_magicface, replaced_layers
from magicstudio.attention.segmentation import assign_pixels, propagate, token_maps
from magicstudio.errors import UserError
from magicstudio.methods.magicface import (Concept, MagicFaceSampler, find_word_positions, mask_kind, parse_concept,
                                           prepare_references, run_magicface)

SIDE = 4  # synthetic layer: 4x4 pixels, batch [uncond target, cond target, ref 0, ref 1]


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    return attn, torch.randn(4, SIDE * SIDE, 8)


def _run(attn, x, state):
    with torch.no_grad():
        return MagicFaceProcessor(state, AttentionStore(active=False), "layer", replace=True)(attn, x)


def _plain(attn, x):
    with torch.no_grad():
        return AttnProcessor2_0()(attn, x)


def _naive(attn, x, sources):
    """Cond-target output of a joint softmax over ``sources``: (batch row, logit bias per key or None)."""
    def heads(t):
        return t.view(t.shape[0], attn.heads, -1).transpose(0, 1)

    with torch.no_grad():
        q = heads(attn.to_q(x[1]))
        logits, values = [], []
        for row, bias in sources:
            k, v = heads(attn.to_k(x[row])), heads(attn.to_v(x[row]))
            logits.append(q @ k.transpose(-1, -2) * attn.scale + (0 if bias is None else bias))
            values.append(v)
        probs = torch.cat(logits, -1).softmax(-1)
        out = (probs @ torch.cat(values, 1)).transpose(0, 1).reshape(x.shape[1], -1)
        return attn.to_out[0](out), probs


def _bias(mask, w):
    return torch.where(mask.flatten() > 0, torch.tensor(w), torch.tensor(float("-inf")))


def test_rsa_with_empty_masks_is_plain_self_attention(layer):
    attn, x = layer
    state = MagicFaceState(torch.zeros(2, 16, 16), [3.0, 3.0], mode="rsa")
    assert torch.equal(_run(attn, x, state), _plain(attn, x))


def test_rsa_adds_the_weight_inside_the_mask_only(layer):
    attn, x = layer
    masks = torch.zeros(2, SIDE, SIDE)
    masks[0, :2] = 1  # reference 0: top half
    masks[1, :, 3] = 1  # reference 1: last column
    state = MagicFaceState(masks, [3.0, 3.0], mode="rsa", record_mass=True)
    out = _run(attn, x, state)
    expected, probs = _naive(attn, x, [(1, None), (2, _bias(masks[0], 3.0)), (3, _bias(masks[1], 3.0))])
    assert torch.allclose(out[1], expected, atol=1e-5)
    plain = _plain(attn, x)
    assert torch.equal(out[[0, 2, 3]], plain[[0, 2, 3]])  # unconditional branch and references: plain
    assert not torch.allclose(out[1], plain[1], atol=1e-3)
    # the probabilities themselves: mass on each reference as written out, none outside the masks
    n = SIDE * SIDE
    mass = probs.mean(0)
    assert torch.allclose(state.mass["layer"], torch.stack([mass[:, n:2 * n].sum(1), mass[:, 2 * n:].sum(1)], 1), atol=1e-6)
    assert (probs[..., n:2 * n][..., masks[0].flatten() == 0] == 0).all()
    # +w inside: each in-mask reference key weighs exp(w) times more than at w = 0
    _, probs0 = _naive(attn, x, [(1, None), (2, _bias(masks[0], 0.0)), (3, _bias(masks[1], 0.0))])
    ratio = (probs[..., n:] / probs[..., :n].sum(-1, keepdim=True)) / (probs0[..., n:] / probs0[..., :n].sum(-1, keepdim=True))
    inside = torch.cat([masks[0].flatten(), masks[1].flatten()]) > 0
    assert torch.allclose(ratio[..., inside], torch.tensor(np.exp(3.0), dtype=torch.float32), rtol=1e-4)
    # keys and values of a reference outside its mask are ignored exactly
    x2 = x.clone()
    x2[2, masks[0].flatten() == 0] += 5.0
    assert torch.equal(_run(attn, x2, MagicFaceState(masks, [3.0, 3.0], mode="rsa"))[1], out[1])


def test_rba_routes_assigned_pixels_and_leaves_the_rest_untouched(layer):
    attn, x = layer
    masks = torch.ones(2, SIDE, SIDE)
    masks[1, 2:] = 0
    assignment = torch.full((2, 2), -1)
    assignment[0, 0], assignment[1, 1] = 0, 1  # a 2x2 segmentation, upsampled (nearest) to the 4x4 layer
    state = MagicFaceState(masks, [3.0, 3.0], mode="rba", assignment=assignment, record_mass=True)
    out, plain = _run(attn, x, state), _plain(attn, x)
    route = torch.nn.functional.interpolate(assignment[None, None].float(), size=(SIDE, SIDE)).flatten().long()
    assert torch.equal(out[1, route == -1], plain[1, route == -1])
    assert torch.equal(out[[0, 2, 3]], plain[[0, 2, 3]])
    for i in (0, 1):
        expected, _ = _naive(attn, x, [(1, None), (2 + i, _bias(masks[i], 3.0))])
        assert torch.allclose(out[1, route == i], expected[route == i], atol=1e-5)
        mass = state.mass["layer"][:, i]
        assert (mass[route == i] > 0).all() and (mass[route != i] == 0).all()


def test_segmentation_assigns_pixels_to_the_right_tokens():
    # 4x4 pixels, left half and right half are two self-attention regions; tokens: 0 <start> (everywhere,
    # strong), 1 filler, 2 = concept 0, 4 and 5 = concept 1 (a two-token word)
    n, t = 16, 6
    left = torch.tensor([c < 2 for _ in range(4) for c in range(4)])
    sa = torch.zeros(n, n)
    for group in (left, ~left):
        sa[group.nonzero(), group] = 1.0 / int(group.sum())
    ca = torch.full((n, t), 0.01)
    ca[:, 0] = 0.9
    ca[left, 2] = 0.3
    ca[~left, 4] = 0.15
    ca[~left, 5] = 0.15
    ca[0] = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.6, 0.0])  # one noisy left pixel points at concept 1
    ca = ca / ca.sum(1, keepdim=True)
    assert torch.allclose(propagate(sa, ca), ((sa + 3 * sa @ sa) / 4) @ ca)
    maps = token_maps([(sa, ca)], 4)
    assert assign_pixels(maps, [[2], [4, 5]]).tolist() == [[0, 0, 1, 1]] * 4  # the noisy pixel follows its region
    # raw cross-attention alone would get that pixel wrong: the propagation is what fixes it
    raw = ca.T.reshape(t, 4, 4) / ca.T.reshape(t, 4, 4).mean((1, 2), keepdim=True)
    assert assign_pixels(raw, [[2], [4, 5]])[0, 0] == 1
    # non-concept tokens are down-weighted (x0.9): a tie goes to the concept, a clear win does not
    maps = torch.ones(3, 2, 2)
    maps[0, 1, 1] = 1.2
    assert assign_pixels(maps, [[1]]).tolist() == [[0, 0], [0, -1]]


def test_concepts_words_and_masks():
    assert parse_concept("woman=me.jpg") == Concept("woman", "me.jpg")
    assert parse_concept("shirt=a/shirt.jpg:a/m.png") == Concept("shirt", "a/shirt.jpg", "a/m.png")
    for bad in ("woman", "=x.jpg", "woman=", "a;b=x.jpg", "w=img.jpg:"):
        with pytest.raises(UserError):
            parse_concept(bad)
    assert mask_kind("woman", ["woman"]) == "head" and mask_kind("woman", ["woman", "hair"]) == "face"
    assert mask_kind("curly hair", []) == "hair" and mask_kind("shirt", []) is None


def test_word_positions(tiny):
    tok = tiny.tokenizer
    pos = find_word_positions(tok, "a woman with curly hair wearing a t-shirt", ["woman", "t-shirt", "curly hair"])
    assert pos == [[2], [8, 9, 10], [4, 5]]
    with pytest.raises(UserError, match="'hat'"):
        find_word_positions(tok, "a woman wearing a shirt", ["woman", "hat"])


@pytest.fixture(scope="module")
def tiny():
    from magicstudio.models import load_base

    return load_base("tiny")


@pytest.fixture(scope="module")
def references():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    return prepare_references([Concept("shirt", images[0], mask), Concept("hat", images[1], mask)], 64)


def test_tiny_model_rsa_rba_through_the_unet(tiny, references):
    unet = tiny.unet
    sampler = MagicFaceSampler(tiny, "a man wearing a shirt and a hat", references, steps=4)
    state, emb = sampler.state, sampler.embeddings
    torch.manual_seed(1)
    x = torch.cat([torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1), torch.randn(2, 4, 8, 8)])
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=emb).sample
    layers = replaced_layers(unet)
    assert layers == [n for n in layers if n.startswith(("up_blocks.2.", "up_blocks.3.")) and n.endswith("attn1")]
    assert len(layers) == 4
    first = layers[0]
    outputs = {}
    hook = unet.get_submodule(first).register_forward_hook(lambda m, a, out: outputs.__setitem__("first", out[1]))
    previous = install_magicface(unet, state, AttentionStore(active=False), layers)
    try:
        with torch.no_grad():
            # RSA with every reference masked out: the whole UNet is exactly the plain one
            state.set_masks(torch.zeros_like(state.ref_masks))
            state.mode = "rsa"
            assert torch.equal(unet(x, 500, encoder_hidden_states=emb).sample, plain)
            # RBA with a fixed segmentation: left half -> shirt (0), right half -> hat (1)
            state.set_masks(torch.ones(2, 64, 64))
            state.mode, state.record_mass = "rba", True
            state.assignment = torch.tensor([[0, 0, 1, 1]] * 4)
            unet(x, 500, encoder_hidden_states=emb)
            base = outputs["first"].clone()
            for name in layers:
                side = int(state.mass[name].shape[0] ** 0.5)
                region = state.routing(side)
                for i in (0, 1):
                    mass = state.mass[name][:, i]
                    assert mass[region == i].mean() > 0.05 and (mass[region != i] == 0).all()
            # causally: changing the hat reference alters the first replaced layer only where the hat is
            x2 = x.clone()
            x2[3] += 1.0
            unet(x2, 500, encoder_hidden_states=emb)
            changed = (outputs["first"] - base).abs().amax(-1) > 0
            hat = state.routing(int(changed.numel() ** 0.5)) == 1
            assert changed[hat].all() and not changed[~hat].any()
    finally:
        hook.remove()
        restore_processors(unet, previous)


def test_references_are_renoised_with_fresh_noise_every_step(tiny, references):
    seen = []
    hook = tiny.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), int(args[1]))))
    try:
        with MagicFaceSampler(tiny, "a shirt and a hat", references, steps=3) as sampler:
            sampler.sample(0)
    finally:
        hook.remove()
    alphas = tiny.inference_scheduler("ddim").alphas_cumprod
    noises = []
    for x, t in seen:  # batch: [uncond target, cond target, shirt, hat]
        assert x.shape[0] == 4 and torch.equal(x[0], x[1])
        noise = (x[2:] - alphas[t].sqrt() * sampler.ref_latents) / (1 - alphas[t]).sqrt()
        assert 0.8 < float(noise.std()) < 1.2
        noises.append(noise)
    assert len(noises) == 3 and not any(torch.allclose(a, b) for i, a in enumerate(noises) for b in noises[i + 1:])


def test_run_magicface_end_to_end(tiny, tmp_path, caplog):
    from magicstudio.data.samples import sample_photos

    shirt = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(shirt)
    mask = np.zeros((80, 60), np.uint8)
    mask[40:, 10:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    concepts = [f"woman={sample_photos()[0]}", f"shirt={shirt}:{tmp_path / 'mask.png'}", f"flag={shirt}"]
    with caplog.at_level("WARNING"):
        paths = run_magicface(concepts, "a woman wearing a shirt, with a flag", tmp_path / "out", comps=tiny,
                              size=64, steps=4, alpha=0.5, num_images=1, seed=3, save_masks=True)
    assert "'flag' has no mask" in caplog.text
    assert [p.name for p in paths] == ["000-seed3.png"]
    img = Image.open(paths[0])
    assert img.size == (64, 64) and "Seed: 3" in img.info["parameters"] and "MagicFace" in img.info["parameters"]
    steps = sorted((tmp_path / "out" / "masks" / "000-seed3").glob("step*.png"))
    assert len(steps) == 4 and Image.open(steps[0]).size == (64, 64)
    assert (tmp_path / "out" / "000-seed3-masks.png").exists() and (tmp_path / "out" / "references.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--concept", "woman", "--prompt", "a woman"], "bad --concept"),
    (["--concept", "hat=x.png", "--prompt", "a woman"], "'hat' is not in the prompt"),
    (["--concept", "woman=/nonexistent/me.jpg", "--prompt", "a woman"], "file not found"),
])
def test_cli_errors_are_one_line(args, message, capsys, tmp_path):
    from magicstudio.cli.main import main

    code = main(["face", *args, "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
