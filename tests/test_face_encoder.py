"""ArcFace IResNet, weight loading, embeddings and differentiable 5-point alignment (MagiCapture Eq. 7: R and B)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magicstudio.errors import UserError
from magicstudio.io import save_tensors
from magicstudio.models.face_align import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    align_from_box,
    arcface_template,
    similarity_transform,
    warp_affine,
)
from magicstudio.models.face_encoder import ArcFaceEncoder, FaceEncoder, load_face_encoder
from magicstudio.models.iresnet import IResNet, iresnet50, iresnet100


def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict like a trained one: random weights and non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.05
    return state


def _smooth_image(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8, width // 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)


# ---------------------------------------------------------------- architecture


def test_iresnet_matches_published_key_names_and_sizes() -> None:
    with torch.device("meta"):
        r50, r100 = iresnet50(), iresnet100()
    keys = set(r50.state_dict())
    for key in (
        "conv1.weight", "bn1.running_var", "prelu.weight",
        "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.bias", "layer1.0.prelu.weight",
        "layer1.0.conv2.weight", "layer1.0.bn3.running_mean", "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var", "layer3.13.conv2.weight", "layer4.2.bn3.weight",
        "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean",
    ):
        assert key in keys, key
    assert "layer3.14.conv1.weight" not in keys and "layer1.1.downsample.0.weight" not in keys
    sd = r50.state_dict()
    assert tuple(sd["fc.weight"].shape) == (512, 25088)
    assert tuple(sd["layer1.0.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert abs(sum(p.numel() for p in r50.parameters()) - 43.6e6) < 0.05e6
    assert abs(sum(p.numel() for p in r100.parameters()) - 65.2e6) < 0.05e6
    assert not r50.features.weight.requires_grad


def test_iresnet_block_order_and_stride() -> None:
    """One block computes x_down + BN3(conv2_s2(PReLU(BN2(conv1(BN1(x)))))): check it functionally."""
    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), width=8, num_features=16).eval()
    net.load_state_dict(_randomize(net, 1))
    block = net.layer1[0]
    x = torch.randn(2, 8, 14, 14)

    def bn(m: torch.nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    out = bn(block.bn1, x)
    out = F.conv2d(out, block.conv1.weight, padding=1)
    out = F.prelu(bn(block.bn2, out), block.prelu.weight)
    out = bn(block.bn3, F.conv2d(out, block.conv2.weight, stride=2, padding=1))
    short = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    torch.testing.assert_close(block(x), out + short)
    assert net(torch.randn(2, 3, 112, 112)).shape == (2, 16)


# ---------------------------------------------------------------- loading


def test_r50_backbone_pth_and_safetensors_load_identically(tmp_path) -> None:
    with torch.device("meta"):
        template = iresnet50()
    state = _randomize(template, 2)
    torch.save(state, tmp_path / "backbone.pth")
    save_tensors(tmp_path / "backbone.safetensors", {k: v for k, v in state.items()})
    a = ArcFaceEncoder.from_weights(tmp_path / "backbone.pth")
    b = ArcFaceEncoder.from_weights(tmp_path / "backbone.safetensors", arch="r50")
    assert a.name == b.name == "arcface-r50" and a.embedding_dim == 512
    torch.testing.assert_close(a.backbone.layer3[13].conv2.weight, state["layer3.13.conv2.weight"])
    x = _smooth_image(2, 112, 112)
    ea, eb = a.embed(x), b.embed(x)
    assert ea.shape == (2, 512)
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)


def test_tiny_roundtrip_with_ddp_prefix_and_without_batch_counters(tmp_path) -> None:
    tiny = ArcFaceEncoder.tiny(seed=3)
    state = _randomize(tiny.backbone, 4)
    ref = IResNet((1, 1, 1, 1), width=16, num_features=64).eval()
    ref.load_state_dict(state)
    stripped = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(stripped, tmp_path / "model.pt")
    enc = load_face_encoder(tmp_path / "model.pt")
    assert isinstance(enc, ArcFaceEncoder) and enc.name == "arcface-iresnet[1, 1, 1, 1]-w16-d64"
    x = _smooth_image(3, 112, 112, seed=5)
    torch.testing.assert_close(enc.embed(x), F.normalize(ref(x), dim=-1))


def test_loading_errors_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        ArcFaceEncoder.from_weights(tmp_path / "nope.pth")

    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _Custom()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refusing"):
        ArcFaceEncoder.from_weights(tmp_path / "evil.pth")

    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"not an ArcFace IResNet state dict: missing conv1\.weight"):
        ArcFaceEncoder.from_weights(tmp_path / "other.pth")

    state = _randomize(ArcFaceEncoder.tiny().backbone, 0)
    renamed = dict(state)
    renamed["layer2.0.bnX.weight"] = renamed.pop("layer2.0.bn1.weight")
    save_tensors(tmp_path / "renamed.safetensors", renamed)
    with pytest.raises(UserError, match=r"1 missing keys: layer2\.0\.bn1\.weight; 1 unexpected keys: layer2\.0\.bnX"):
        ArcFaceEncoder.from_weights(tmp_path / "renamed.safetensors")

    resized = dict(state)
    resized["layer4.0.prelu.weight"] = torch.zeros(7)
    save_tensors(tmp_path / "resized.safetensors", resized)
    with pytest.raises(UserError, match=r"shape mismatches .*layer4\.0\.prelu\.weight \(7,\) vs \(128,\)"):
        ArcFaceEncoder.from_weights(tmp_path / "resized.safetensors")

    save_tensors(tmp_path / "tiny.safetensors", state)
    with pytest.raises(UserError, match=r"does not match ArcFace IResNet r100: .*missing keys: .*layer1\.1\."):
        ArcFaceEncoder.from_weights(tmp_path / "tiny.safetensors", arch="r100")
    with pytest.raises(UserError, match="unknown ArcFace arch"):
        ArcFaceEncoder.from_weights(tmp_path / "tiny.safetensors", arch="r42")
    with pytest.raises(UserError, match="tiny:SEED"):
        load_face_encoder("tiny:x")


class _Custom:
    pass


def test_load_face_encoder_specs() -> None:
    assert load_face_encoder(None) is None
    enc = load_face_encoder("tiny:7")
    assert isinstance(enc, FaceEncoder) and enc.input_size == 112 and enc.embedding_dim == 64
    assert load_face_encoder(enc) is enc
    x = _smooth_image(1, 112, 112)
    torch.testing.assert_close(enc.embed(x), ArcFaceEncoder.tiny(7).embed(x))
    assert not torch.allclose(enc.embed(x), ArcFaceEncoder.tiny(8).embed(x))


# ---------------------------------------------------------------- embedding


def test_embedding_unit_norm_frozen_and_differentiable() -> None:
    enc = ArcFaceEncoder.tiny(seed=1)
    enc.train()  # must stay frozen in eval mode, e.g. when a parent module is put in training mode
    assert not enc.training and not enc.backbone.layer1[0].bn1.training
    x = _smooth_image(3, 112, 112).requires_grad_(True)
    emb = enc(x)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(enc.embed(x[1:2]), emb[1:2])  # eval BN: independent of the batch
    (1 - (emb[0] * emb[1]).sum()).backward()  # Eq. 7 style 1 - cos
    assert x.grad is not None and x.grad[:2].abs().sum() > 0 and x.grad[2].abs().sum() == 0
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())
    with pytest.raises(ValueError, match="112"):
        enc.embed(torch.zeros(1, 3, 64, 64))


# ---------------------------------------------------------------- alignment


def _similarity(scale: float, angle: float, tx: float, ty: float) -> torch.Tensor:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float64)


def _apply(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return pts @ m[:, :2].T + m[:, 2]


def test_similarity_transform_recovers_known_transform_and_is_least_squares() -> None:
    src = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)
    truth = torch.stack([_similarity(2.5, 0.4, 30.0, -12.0), _similarity(0.7, -2.9, 5.0, 80.0)])
    dst = torch.stack([_apply(m, src) for m in truth])
    torch.testing.assert_close(similarity_transform(src.expand(2, 5, 2), dst), truth)
    torch.testing.assert_close(similarity_transform(src, dst[0]), truth[0])

    # noisy points: equals Umeyama's SVD solution (the estimator insightface uses via skimage)
    g = torch.Generator().manual_seed(0)
    noisy = dst[0] + torch.randn(5, 2, generator=g, dtype=torch.float64) * 3
    mu_s, mu_d = src.mean(0), noisy.mean(0)
    cov = (noisy - mu_d).T @ (src - mu_s) / 5
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.diag(torch.tensor([1.0, float(torch.sign(torch.det(u) * torch.det(vt)))], dtype=torch.float64))
    rot = u @ d @ vt
    scale = (sig * d.diagonal()).sum() / ((src - mu_s) ** 2).sum(1).mean()
    umeyama = torch.cat([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], 1)
    torch.testing.assert_close(similarity_transform(src, noisy), umeyama)


def _dots_image(points: torch.Tensor, height: int, width: int, sigma: float = 1.2) -> torch.Tensor:
    """Dark [-1, 1] image with one Gaussian dot per point (each in its own channel group for identification)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    img = -torch.ones(len(points), height, width, dtype=torch.float64)
    for i, (x, y) in enumerate(points.tolist()):
        img[i] += 2 * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return img.float()


def _centroid(channel: torch.Tensor) -> tuple[float, float]:
    w = (channel + 1).clamp_min(0).double()
    ys, xs = torch.meshgrid(torch.arange(channel.shape[0]), torch.arange(channel.shape[1]), indexing="ij")
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


def test_align_faces_puts_landmark_dots_on_the_template() -> None:
    template = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)
    transform = _similarity(2.3, 0.5, 140.0, 20.0)
    landmarks = _apply(transform, template - 56.0) + torch.tensor([0.0, 60.0], dtype=torch.float64)
    dots = _dots_image(landmarks, 320, 300, sigma=2.3)  # [5, H, W]: channel i holds dot i
    images = torch.stack([dots[0:3], dots[2:5]])  # two faces, channels carry dots (0,1,2) and (2,3,4)
    lms = torch.stack([landmarks, landmarks]).float()
    out = align_faces(images, lms)
    assert out.shape == (2, 3, 112, 112)
    for b, ids in enumerate(((0, 1, 2), (2, 3, 4))):
        for c, i in enumerate(ids):
            x, y = _centroid(out[b, c])
            assert abs(x - template[i, 0]) < 0.5 and abs(y - template[i, 1]) < 0.5, (i, x, y)


def test_align_faces_identity_and_pixel_convention() -> None:
    image = _smooth_image(1, 112, 112)
    same = align_faces(image, arcface_template()[None])
    torch.testing.assert_close(same, image, atol=1e-5, rtol=0)

    # Pixel centres at integers: landmarks = 2 * template + (7, 3) maps output pixel (u, v) exactly onto input
    # pixel (2u + 7, 2v + 3). A half-pixel slip in the normalised-coordinate conversion would blend neighbours.
    big = torch.randn(2, 3, 240, 250, generator=torch.Generator().manual_seed(1))
    lms = (arcface_template() * 2 + torch.tensor([7.0, 3.0])).expand(2, 5, 2)
    out = align_faces(big, lms)
    # (float32 grid rounding is ~1e-4 here; a half-pixel slip on this white noise would be ~0.5)
    torch.testing.assert_close(out, big[:, :, 3 : 3 + 224 : 2, 7 : 7 + 224 : 2], atol=1e-3, rtol=0)


def test_align_faces_matches_insightface_norm_crop() -> None:
    cv2 = pytest.importorskip("cv2")
    image = _smooth_image(1, 200, 160, seed=3)
    g = torch.Generator().manual_seed(2)
    lms = _apply(_similarity(1.4, -0.35, 20.0, 60.0), torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64))
    lms = (lms + torch.randn(5, 2, generator=g, dtype=torch.float64)).float()  # partly outside: tests the border
    m = similarity_transform(lms.double(), torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)).numpy()
    pixels = ((image[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
    ref = cv2.warpAffine(pixels, m, (112, 112), borderValue=0.0)  # insightface norm_crop
    ref = torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1
    out = align_faces(image, lms[None])[0]
    assert (ref == -1).any()  # the crop does reach outside the image
    # OpenCV 4.x quantises bilinear weights to 1/32 px (INTER_BITS=5), 5.x does not: allow that quantisation
    # per pixel, but the two must agree on average to interpolation precision.
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)
    assert (out - ref).abs().mean() < 2e-3


def test_alignment_is_differentiable_wrt_images() -> None:
    image = _smooth_image(2, 128, 128).requires_grad_(True)
    lms = (arcface_template() + 8).expand(2, 5, 2)
    enc = ArcFaceEncoder.tiny()
    emb = enc.embed(align_faces(image, lms, padding_mode="border"))
    (emb[0] * emb[1]).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # pixels far outside the aligned crop get no gradient
    assert image.grad[:, :, 125:, :].abs().sum() == 0


def test_align_from_box_square_crop() -> None:
    image = torch.randn(1, 3, 100, 120, generator=torch.Generator().manual_seed(4))
    # box 56 wide, 30 high, centre (49.5, 39.5): a 56-px square crop at 28 px is an exact 2x downsampling,
    # output pixel (u, v) <- input point (22.5 + 2u, 12.5 + 2v), the mean of a 2x2 block
    box = torch.tensor([[21.5, 24.5, 77.5, 54.5]])
    out = align_from_box(image, box, size=28)
    expected = F.avg_pool2d(image[:, :, 12:68, 22:78], 2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # box of side 112 at the origin of a 112 image is the identity
    image112 = _smooth_image(2, 112, 112)
    boxes = torch.tensor([[-0.5, -0.5, 111.5, 111.5]]).expand(2, 4)
    torch.testing.assert_close(align_from_box(image112, boxes), image112, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        align_from_box(image, torch.tensor([[5.0, 5.0, 5.0, 5.0]]))


def test_warp_affine_black_border() -> None:
    image = torch.zeros(1, 3, 10, 10)
    shifted = warp_affine(image, torch.tensor([[1.0, 0.0, 20.0], [0.0, 1.0, 0.0]]), 10)  # moved out of view
    torch.testing.assert_close(shifted, -torch.ones(1, 3, 10, 10))
    zeros = warp_affine(image - 0.5, torch.tensor([[1.0, 0.0, 20.0], [0.0, 1.0, 0.0]]), 10, padding_mode="zeros")
    torch.testing.assert_close(zeros, torch.zeros(1, 3, 10, 10))
