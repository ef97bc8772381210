"""The frozen VAE decoder of the identity / structure losses in reduced precision (models/precision.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from magicstudio.errors import UserError
from magicstudio.training.concepts import load_concept
from magicstudio.methods.magicapture import make_config
from magicstudio.methods.magicapture.train import MagiCapture
from magicstudio.models import precision as P
from magicstudio.models.face_encoder import load_face_encoder


def test_frozen_dtype_choices(monkeypatch):
    big, small = torch.nn.Linear(2300, 2300), torch.nn.Linear(8, 8)  # 5.3 M and 72 parameters
    assert P.frozen_dtype("fp32", "cpu", big) is None
    assert P.frozen_dtype("bf16", "cpu", small) is torch.bfloat16  # explicit choices are obeyed
    assert P.frozen_dtype("fp16", "cpu") is torch.float16
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    assert P.frozen_dtype("auto", "cpu", big) is torch.bfloat16
    assert P.frozen_dtype("auto", "cpu", small) is None  # casts would cost more than tiny convolutions save
    monkeypatch.setattr(P, "native_bf16", lambda device: False)
    assert P.frozen_dtype("auto", "cpu", big) is None  # emulated bf16 is slower than fp32
    with pytest.raises(ValueError):
        P.frozen_dtype("int8", "cpu")
    with pytest.raises(UserError, match="decode_precision"):
        make_config("smoke", decode_precision="half")


def test_use_checkpointing_choices():
    big, small = torch.nn.Linear(2300, 2300), torch.nn.Linear(8, 8)
    assert P.use_checkpointing("auto", big) and not P.use_checkpointing("auto", small)
    assert P.use_checkpointing("on", small) and not P.use_checkpointing("off", big)
    with pytest.raises(ValueError):
        P.use_checkpointing("yes", big)
    with pytest.raises(UserError, match="decode_checkpointing"):
        make_config("smoke", decode_checkpointing=True)


def test_conv_input_only_changes_layout_for_reduced_precision():
    x = torch.randn(1, 4, 5, 6)
    assert P.conv_input(x, None) is x
    y = P.conv_input(x, torch.bfloat16)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)


def _decode(m, z, precision, weight):
    """Decoded image, gradient of <image, weight> w.r.t. z, and the dtypes the decoder's convolutions produced."""
    m.cfg = replace(m.cfg, decode_precision=precision)
    seen = set()
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.add(o.dtype))
             for mod in m.comps.vae.decoder.modules() if isinstance(mod, torch.nn.Conv2d)]
    try:
        zz = z.clone().requires_grad_(True)
        image = m._decode(zz)
        (image * weight).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return image.detach(), zz.grad, seen


def test_bf16_decoder_is_used_and_its_gradient_matches_fp32(tiny, demo_sets):
    cfg = make_config("smoke", resolution=64, face_encoder="tiny")
    m = MagiCapture(cfg, tiny, load_concept(demo_sets[0], 64), load_concept(demo_sets[1], 64), load_face_encoder("tiny"))
    with torch.no_grad():
        z = m._encode(m.source.images[:1])
    weight = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    img32, g32, dt32 = _decode(m, z, "fp32", weight)
    img16, g16, dt16 = _decode(m, z, "bf16", weight)
    img_auto, _, dt_auto = _decode(m, z, "auto", weight)
    assert dt32 == {torch.float32} and dt16 == {torch.bfloat16}  # the setting reaches the decoder
    assert dt_auto == {torch.float32} and torch.equal(img_auto, img32)  # auto keeps tiny decoders in fp32
    vae = m.comps.vae
    with torch.no_grad():  # fp32 is exactly the plain decode (results made before this setting are unchanged)
        assert torch.equal(img32, vae.decode(z / vae.config.scaling_factor).sample)
    assert img16.dtype == torch.float32 and not torch.equal(img16, img32)
    assert (img16 - img32).abs().max() < 0.05 * img32.abs().max()
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
    assert (g16 - g32).norm() < 0.1 * g32.norm()


def test_identity_loss_gradient_with_a_bf16_decoder(tiny, demo_sets):
    """The whole identity path (region decode -> alignment -> face encoder -> 1 - cos) gives the same loss and
    nearly the same gradient on x0_hat when the decoder runs in bfloat16."""
    cfg = make_config("smoke", resolution=128, face_encoder="tiny")
    m = MagiCapture(cfg, tiny, load_concept(demo_sets[0], 128), load_concept(demo_sets[1], 128),
                    load_face_encoder("tiny"))
    ref = m.reference
    with torch.no_grad():
        z = m._encode(ref.images[:1])
    out = {}
    for precision in ("fp32", "bf16"):
        m.cfg = replace(m.cfg, decode_precision=precision)
        zz = z.clone().requires_grad_(True)
        loss = m._identity(zz, ref.landmarks[:1], ref.boxes[:1])
        loss.backward()
        out[precision] = (loss.item(), zz.grad.flatten())
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert abs(l16 - l32) < 0.02 * max(abs(l32), 1e-3)
    # 0.978 on this CPU (its bf16 kernels), above 0.98 on others: bf16 keeps 8 mantissa bits
    assert g32.norm() > 0 and F.cosine_similarity(g16, g32, dim=0) > 0.97


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward (parameters included)."""

    def __init__(self):
        self.sizes = {}

    def pack(self, t):
        storage = t.untyped_storage()
        self.sizes[storage.data_ptr()] = max(self.sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    @property
    def total(self):
        return sum(self.sizes.values())


def test_decoder_checkpointing_keeps_the_gradient_and_saves_activations(tiny, demo_sets):
    grads, saved = {}, {}
    for ckpt in (False, True):
        cfg = make_config("smoke", resolution=128, face_encoder="tiny", decode_checkpointing="on" if ckpt else "off",
                          decode_precision="fp32")
        m = MagiCapture(cfg, copy.deepcopy(tiny), load_concept(demo_sets[0], 128), load_concept(demo_sets[1], 128),
                        load_face_encoder("tiny"))
        with torch.no_grad():
            z = m._encode(m.source.images[:1])
        zz = z.clone().requires_grad_(True)
        counter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            image = m._decode(zz)
        (image * torch.linspace(-1, 1, image.numel()).reshape(image.shape)).sum().backward()
        grads[ckpt], saved[ckpt] = zz.grad, counter.total
    weights = sum(p.numel() * p.element_size() for p in tiny.vae.decoder.parameters())
    assert torch.equal(grads[True], grads[False])  # recomputation: the very same gradient
    assert saved[True] < 0.3 * (saved[False] - weights), (saved, weights)  # kept for backward: block inputs only
