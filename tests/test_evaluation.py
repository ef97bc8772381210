"""Evaluation metrics: preprocessing by hand, tiny random CLIP/DINO, face masking in Style, the dlib identity
embedding on the bundled real photos, LAION aesthetic head layouts, the report and the CLI's error paths."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from magicstudio.cli.main import main
from magicstudio.data.images import load_image
from magicstudio.data.prepare import load_prepared
from magicstudio.data.samples import sample_photos
from magicstudio.errors import UserError
from magicstudio.evaluation import clean_prompt, evaluate_images, load_prompts, summarise, write_report
from magicstudio.evaluation.aesthetic import load_aesthetic_head
from magicstudio.evaluation.clip import CLIP_MEAN, CLIP_STD, Preprocess, load_clip, load_dino
from magicstudio.io import save_tensors
from magicstudio.training.sampling import save_png


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {p.stem: load_image(p) for p in sample_photos()}


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ---------------------------------------------------------------- preprocessing, tiny CLIP / DINO


def test_preprocess_matches_hand_computation():
    # 40x20 image of four 10 px vertical stripes: shortest side 20 -> 10 gives 20x10 (stripes 5 px wide), and the
    # centre crop keeps resized columns 5..14, i.e. stripes 1 and 2. Away from stripe edges (bicubic support is
    # +-2 output px at this 2x reduction) every pixel is exactly its stripe's colour, normalised by hand.
    colours = np.array([[250, 10, 10], [20, 200, 40], [30, 60, 220], [240, 240, 0]], np.uint8)
    arr = np.repeat(colours[None, :, None, :], 10, axis=2).reshape(1, 40, 3).repeat(20, axis=0)
    pre = Preprocess(10, (10, 10), CLIP_MEAN, CLIP_STD)
    out = pre([Image.fromarray(arr)])
    assert out.shape == (1, 3, 10, 10) and out.dtype == torch.float32

    def expected(c):
        return (c / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)

    for col, stripe in ((2, 1), (7, 2)):
        got = out[0, :, :, col].numpy()  # (3, 10): the whole column
        assert np.allclose(got, expected(colours[stripe])[:, None], atol=1e-5), (col, got[:, 0])
    # portrait orientation: the same stripes turned into rows, cropped vertically
    out_t = pre([Image.fromarray(arr.transpose(1, 0, 2).copy())])
    assert torch.allclose(out_t[0], out[0].transpose(1, 2), atol=1e-5)
    # an image already at the crop size is only normalised
    small = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    got = pre([Image.fromarray(small)])[0].permute(1, 2, 0).numpy()
    assert np.allclose(got, expected(small.astype(np.float64)), atol=1e-5)
    # the masking colour normalises to ~0
    grey = pre([Image.new("RGB", (10, 10), pre.fill_colour)])
    assert grey.abs().max() < 0.01


def test_preprocess_agrees_with_transformers_clip_processor():
    proc_mod = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    proc = proc_mod.CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (75, 61, 3), dtype=np.uint8))
    ref = torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"]))
    mine = Preprocess(48, (48, 48), CLIP_MEAN, CLIP_STD)([img])
    assert mine.shape == ref.shape == (1, 3, 48, 48)
    assert torch.allclose(mine, ref.float(), atol=1e-4)


def test_tiny_clip_and_dino_embeddings(clip, photos):
    dino = load_dino("tiny")
    images = [photos["astronaut"], photos["grace_hopper"], ImageOps.mirror(photos["astronaut"])]
    for model, dim in ((clip, 16), (dino, 32)):
        e = model.image_embeddings(images)
        assert e.shape == (3, dim) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
        again = model.image_embeddings([images[0]])
        assert float(again[0] @ e[0]) == pytest.approx(1.0, abs=1e-5)  # an image with itself
        assert float(e[0] @ e[1]) < 0.9999  # random weights still tell two photos apart
    t = clip.text_embeddings(["a photo of a person", "a cat"])
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(t[0] @ t[1]) < 0.9999
    # "tiny" is seeded: the same random model every time
    assert torch.allclose(load_clip("tiny").image_embeddings(images[:1]), clip.image_embeddings(images[:1]))


def test_clip_and_dino_load_from_folders(tmp_path, clip, photos):
    from transformers import CLIPModel, ViTModel

    from magicstudio.evaluation.clip import tiny_clip_config, tiny_vit_config

    model = CLIPModel(tiny_clip_config())
    model.load_state_dict(clip.model.state_dict())
    model.save_pretrained(tmp_path / "clip")
    # a processor config that differs from the defaults: its values must be the ones used
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 80}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    loaded = load_clip(str(tmp_path / "clip"))
    assert loaded.preprocess == Preprocess(80, (64, 64), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 3)
    img = photos["astronaut"]
    by_hand = clip.model.visual_projection(clip.model.vision_model(pixel_values=loaded.preprocess([img])).pooler_output)
    assert torch.allclose(loaded.image_embeddings([img])[0],
                          torch.nn.functional.normalize(by_hand, dim=-1)[0].detach(), atol=1e-5)
    # no tokenizer files in the folder: the bundled CLIP vocabulary is used
    assert torch.allclose(loaded.text_embeddings(["a photo"]), clip.text_embeddings(["a photo"]), atol=1e-5)

    vit = ViTModel(tiny_vit_config(), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "dino")
    dino = load_dino(str(tmp_path / "dino"))
    assert dino.preprocess.size == 36 and dino.preprocess.crop == (32, 32)  # DINO's resize 256 / crop 224
    assert dino.image_embeddings([img]).shape == (1, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no loadable CLIP model"):
        load_clip(str(tmp_path / "empty"))


def test_missing_weights_are_one_line_reasons_and_other_metrics_still_run(demo_sets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, reference = demo_sets
    with pytest.raises(UserError, match="not available"):
        load_clip("openai/clip-vit-large-patch14")
    with pytest.raises(UserError, match="not a folder"):
        load_dino("/nonexistent/dino")
    report = evaluate_images(source, source, reference, metrics=["csim", "style", "dino", "aesthetic", "dreamsim"],
                             face_backend="arcface:tiny")
    s = report["summary"]
    assert s["csim"]["n"] == 4 and s["csim"]["misses"] == 0
    for metric in ("style", "dino", "aesthetic", "dreamsim"):
        assert set(s[metric]) == {"error"} and "\n" not in s[metric]["error"], s[metric]
    assert "--clip-model" in s["style"]["error"] and "--dino-model" in s["dino"]["error"]
    assert all(row["style"] is None and row["dino"] is None and row["csim"] is not None for row in report["images"])


# ---------------------------------------------------------------- Style: faces are masked out


def _edit(path: Path, region: np.ndarray, seed: int) -> None:
    arr = np.array(Image.open(path).convert("RGB"))
    noise = np.random.default_rng(seed).integers(0, 256, arr.shape, dtype=np.uint8)
    arr[region] = noise[region]
    Image.fromarray(arr).save(path)


def test_style_ignores_face_pixels_but_not_background(demo_sets, tmp_path):
    source, reference = demo_sets
    gen = tmp_path / "generated"
    shutil.copytree(source, gen)  # a prepared folder: its stored face masks are used
    ref = tmp_path / "reference"
    shutil.copytree(reference, ref)
    items = load_prepared(gen).items
    target = items[0]
    face = target.load_mask("face") > 0
    assert 0.03 < face.mean() < 0.5

    def scores():
        r = evaluate_images(gen, None, ref, metrics=["style", "clip_i"], clip_model="tiny")
        return [row["style"] for row in r["images"]], [row["clip_i"] for row in r["images"]]

    style0, clip_i0 = scores()
    _edit(target.image, face, seed=1)  # scramble the generated face
    style1, clip_i1 = scores()
    assert style1 == pytest.approx(style0, abs=1e-6)
    assert abs(clip_i1[0] - clip_i0[0]) > 1e-3  # the unmasked metric does see the face change
    ref_item = load_prepared(ref).items[0]
    ref_face = ref_item.load_mask("face") > 0
    assert ref_face.any()
    _edit(ref_item.image, ref_face, seed=2)  # the reference faces are masked too
    style2, _ = scores()
    assert style2 == pytest.approx(style0, abs=1e-6)
    background = ~face
    background[:, : face.shape[1] // 2] = False  # half of the background
    _edit(target.image, background, seed=3)
    style3, _ = scores()
    assert abs(style3[0] - style0[0]) > 1e-3
    assert style3[1:] == pytest.approx(style0[1:], abs=1e-6)  # other images untouched


def test_style_on_raw_images_uses_the_analyzer_mask(demo_sets, tmp_path, clip):
    from magicstudio.data.faces import MediapipeFaceAnalyzer

    source, reference = demo_sets
    raw = _save(load_prepared(source).items[0].load_image(), tmp_path / "gen" / "a.png")
    r = evaluate_images(raw, None, reference, metrics=["style"], clip_model="tiny")
    assert r["images"][0]["face_found"] is True
    with MediapipeFaceAnalyzer() as fa:
        mask = fa.analyze(load_image(raw)).face_mask
    arr = np.array(load_image(raw))
    arr[mask > 0] = clip.preprocess.fill_colour
    e_gen = clip.image_embeddings([Image.fromarray(arr)])
    refs = []
    for it in load_prepared(reference).items:
        ra = np.array(it.load_image())
        ra[it.load_mask("face") > 0] = clip.preprocess.fill_colour
        refs.append(Image.fromarray(ra))
    expected = float((e_gen @ clip.image_embeddings(refs).T).mean())
    assert r["images"][0]["style"] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- CSIM on real photos (dlib) and ArcFace


def _variants(img: Image.Image) -> list[Image.Image]:
    w, h = img.size
    return [
        ImageOps.mirror(img),
        ImageEnhance.Color(img.crop((30, 20, w - 40, h - 50))).enhance(0.8),
        ImageEnhance.Brightness(ImageOps.mirror(img.crop((10, 40, w - 10, h - 5)))).enhance(1.1),
        img.rotate(8, resample=Image.Resampling.BICUBIC),
        img.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS),
    ]


def _faceless(size=(256, 256)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (size[1], 1))] * 3, axis=-1))


def test_dlib_csim_same_person_scores_clearly_higher(photos, tmp_path):
    pytest.importorskip("dlib", reason="dlib backend: pip install 'magicstudio[eval]'")
    # Measured on these photos (dlib ResNet, mediapipe boxes): same person 0.992-0.999, the other person
    # 0.879-0.897 (dlib descriptors are not zero-mean, so unrelated faces keep a high cosine); bounds below
    # leave ~0.02 of slack on each side of that.
    for person, other in (("astronaut", "grace_hopper"), ("grace_hopper", "astronaut")):
        src = _save(photos[person], tmp_path / person / "src" / "a.png")
        gen = tmp_path / person / "gen"
        for i, im in enumerate(_variants(photos[person])):
            _save(im, gen / f"same_{i}.png")
        for i, im in enumerate([photos[other], *_variants(photos[other])[:2]]):
            _save(im, gen / f"other_{i}.png")
        _save(_faceless(), gen / "zz_noface.png")
        r = evaluate_images(gen, src, None, metrics=["csim", "face_sim"])
        rows = {Path(row["file"]).stem: row for row in r["images"]}
        same = [v["csim"] for k, v in rows.items() if k.startswith("same")]
        diff = [v["csim"] for k, v in rows.items() if k.startswith("other")]
        assert min(same) > 0.97 and max(diff) < 0.92 and min(same) - max(diff) > 0.08, (person, same, diff)
        assert rows["zz_noface"]["csim"] is None and rows["zz_noface"]["face_found"] is False
        s = r["summary"]["csim"]
        assert s["n"] == 8 and s["misses"] == 1 and r["summary"]["face_sim"] == s
        assert r["config"]["face_network"].startswith("dlib") and "dlib" in r["config"]["notes"]["csim"]


def test_arcface_backend_and_training_network_warning(demo_sets, tmp_path, photos):
    from magicstudio.models.face_encoder import ArcFaceEncoder

    source = load_prepared(demo_sets[0]).items[0].image  # one source photo, as a plain file
    weights = save_tensors(tmp_path / "w" / "backbone.safetensors", ArcFaceEncoder.tiny(3).backbone.state_dict())
    copy = tmp_path / "w2" / "same.safetensors"
    copy.parent.mkdir()
    shutil.copy(weights, copy)
    other = save_tensors(tmp_path / "w" / "other.safetensors", ArcFaceEncoder.tiny(4).backbone.state_dict())
    gen = tmp_path / "gen"
    _save(photos["astronaut"], gen / "a.png")
    _save(_faceless(), gen / "b.png")
    r = evaluate_images(gen, source, None, metrics=["csim"], face_backend=f"arcface:{weights}",
                        training_face_encoder=str(copy))
    assert any("identity-loss network" in w for w in r["config"]["warnings"])
    vals = [row["csim"] for row in r["images"]]
    assert vals[0] is not None and -1 <= vals[0] <= 1 and vals[1] is None
    assert r["summary"]["csim"]["n"] == 1 and r["summary"]["csim"]["misses"] == 1
    r2 = evaluate_images(gen, source, None, metrics=["csim"], face_backend=f"arcface:{weights}",
                         training_face_encoder=str(other))
    assert not any("identity-loss" in w for w in r2["config"]["warnings"])
    assert r2["images"][0]["csim"] == pytest.approx(vals[0], abs=1e-6)  # the same network: the same score
    bad = evaluate_images(gen, source, None, metrics=["csim"], face_backend="arcface")
    assert "needs weights" in bad["summary"]["csim"]["error"]
    with pytest.raises(UserError, match="unknown face backend"):
        from magicstudio.evaluation.face_id import load_face_embedder

        load_face_embedder("facenet")


def test_insightface_onnx_backend_matches_arcface_on_the_same_network(demo_sets, tmp_path, photos, monkeypatch):
    """The ONNX path (input layout, alignment, normalisation) with onnxruntime replaced by the same tiny network
    run in torch: it must score exactly like the ArcFace backend on those weights."""
    import sys
    import types

    from magicstudio.models.face_encoder import ArcFaceEncoder

    source = [load_prepared(demo_sets[0]).items[0].image]
    enc = ArcFaceEncoder.tiny(5)
    weights = save_tensors(tmp_path / "r.safetensors", enc.backbone.state_dict())

    class Session:
        def __init__(self, path, providers=None):
            self.path = path

        def get_inputs(self):
            return [types.SimpleNamespace(name="input.1", shape=[1, 3, 112, 112])]

        def run(self, outputs, feeds):
            with torch.no_grad():
                return [enc.backbone(torch.from_numpy(feeds["input.1"])).numpy()]

    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=Session))
    model = tmp_path / "w600k_r50.onnx"
    model.write_bytes(b"stand-in")
    gen = _save(photos["astronaut"], tmp_path / "gen" / "a.png")
    a = evaluate_images(gen, source, None, metrics=["csim"], face_backend=f"arcface:{weights}")
    b = evaluate_images(gen, source, None, metrics=["csim"], face_backend=str(model))
    assert b["config"]["face_network"] == "insightface:w600k_r50.onnx"
    assert b["images"][0]["csim"] == pytest.approx(a["images"][0]["csim"], abs=1e-5)
    missing = evaluate_images(gen, source, None, metrics=["csim"], face_backend=f"insightface:{tmp_path / 'x.onnx'}")
    assert "not found" in missing["summary"]["csim"]["error"]


# ---------------------------------------------------------------- aesthetic head


def _mlp_state(dims, prefix="layers."):
    g = torch.Generator().manual_seed(0)
    state, idx = {}, [0, 2, 4, 6, 7][: len(dims) - 1]
    for i, (a, b) in zip(idx, zip(dims, dims[1:])):
        state[f"{prefix}{i}.weight"] = torch.randn(b, a, generator=g) / math.sqrt(a)
        state[f"{prefix}{i}.bias"] = torch.randn(b, generator=g)
    return state, idx


def test_aesthetic_head_layouts_load_and_score(tmp_path, clip, photos):
    e = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1) * 3.0  # any length: the head normalises
    unit = torch.nn.functional.normalize(e, dim=-1)
    lin = {"weight": torch.randn(1, 16), "bias": torch.randn(1)}
    torch.save(lin, tmp_path / "sa_0_4_vit_l_14_linear.pth")
    head = load_aesthetic_head(tmp_path / "sa_0_4_vit_l_14_linear.pth", embed_dim=16)
    assert torch.allclose(head(e), (unit @ lin["weight"].T + lin["bias"])[:, 0], atol=1e-5)

    state, idx = _mlp_state([16, 64, 32, 16, 8, 1])
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    save_tensors(tmp_path / "mlp.safetensors", state)
    x = unit
    for i in idx:  # the published MLP: linear layers only, no activations
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    for name in ("sac+logos+ava1-l14-linearMSE.pth", "mlp.safetensors"):
        head = load_aesthetic_head(tmp_path / name, embed_dim=16)
        assert len(head.layers) == 5 and torch.allclose(head(e), x[:, 0], atol=1e-5)

    gen = _save(photos["astronaut"], tmp_path / "gen" / "a.png")
    r = evaluate_images(gen, None, None, metrics=["aesthetic"], clip_model="tiny",
                        aesthetic_head=str(tmp_path / "mlp.safetensors"))
    head = load_aesthetic_head(tmp_path / "mlp.safetensors")
    assert r["images"][0]["aesthetic"] == pytest.approx(float(head(clip.image_embeddings([photos["astronaut"]]))[0]),
                                                        abs=1e-5)


def test_aesthetic_head_refuses_bad_files(tmp_path):
    cases = {
        "wrong_keys.pth": {"fc.weight": torch.randn(1, 16)},
        "no_chain.pth": {"layers.0.weight": torch.randn(8, 16), "layers.2.weight": torch.randn(1, 4)},
        "two_outputs.pth": {"weight": torch.randn(2, 16), "bias": torch.randn(2)},
        "bad_bias.pth": {"weight": torch.randn(1, 16), "bias": torch.randn(3)},
        "empty.pth": {},
    }
    for name, state in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(UserError):
            load_aesthetic_head(tmp_path / name)
    torch.save({"weight": torch.randn(1, 768), "bias": torch.randn(1)}, tmp_path / "l14.pth")
    with pytest.raises(UserError, match="768-d"):
        load_aesthetic_head(tmp_path / "l14.pth", embed_dim=16)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    (tmp_path / "head.onnx").write_bytes(b"x")
    for bad in ("text.pth", "head.onnx", "missing.pth"):
        with pytest.raises(UserError):
            load_aesthetic_head(tmp_path / bad)


# ---------------------------------------------------------------- prompts, report, CLI


def test_clip_t_prompts(tmp_path, clip, photos):
    gen = tmp_path / "gen"
    save_png(photos["astronaut"], gen / "000-seed0.png", "a photo of <v1> person in the <v2> style\nSteps: 5, Seed: 0")
    _save(photos["grace_hopper"], gen / "001.png")  # no stored prompt
    assert clean_prompt("a photo of <v1> person in the <v2> style") == "a photo of person in the style"
    r = evaluate_images(gen, None, None, metrics=["clip_t"], clip_model="tiny")
    v = [row["clip_t"] for row in r["images"]]
    expected = float(clip.image_embeddings([photos["astronaut"]])[0] @ clip.text_embeddings(
        ["a photo of person in the style"])[0])
    assert v[0] == pytest.approx(expected, abs=1e-5) and v[1] is None
    assert r["summary"]["clip_t"]["misses"] == 1
    r = evaluate_images(gen, None, None, metrics=["clip_t"], clip_model="tiny", prompts={"001": "a cat"})
    cat = float(clip.image_embeddings([photos["grace_hopper"]])[0] @ clip.text_embeddings(["a cat"])[0])
    assert r["images"][0]["clip_t"] is None and r["images"][1]["clip_t"] == pytest.approx(cat, abs=1e-5)
    r = evaluate_images(gen, None, None, metrics=["clip_t"], clip_model="tiny",
                        prompts="a photo of <v1> person in the <v2> style")
    assert r["images"][0]["clip_t"] == pytest.approx(expected, abs=1e-5) and r["summary"]["clip_t"]["n"] == 2
    (tmp_path / "p.json").write_text(json.dumps({"001.png": "a cat"}))
    (tmp_path / "one.txt").write_text("a dog\n")
    (tmp_path / "many.txt").write_text("000-seed0.png\ta dog\n001\ta cat\n")
    (tmp_path / "bad.txt").write_text("line one\nline two\n")
    assert load_prompts(tmp_path / "p.json") == {"001.png": "a cat"}
    assert load_prompts(tmp_path / "one.txt") == "a dog"
    assert load_prompts(tmp_path / "many.txt") == {"000-seed0.png": "a dog", "001": "a cat"}
    with pytest.raises(UserError, match="NAME<TAB>PROMPT"):
        load_prompts(tmp_path / "bad.txt")


def test_summary_and_report_files(tmp_path):
    s = summarise([0.2, None, 0.4, 0.6])
    assert s["n"] == 3 and s["misses"] == 1
    assert s["mean"] == pytest.approx(0.4) and s["std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert summarise([None, None]) == {"mean": None, "std": None, "n": 0, "misses": 2}
    assert summarise([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1, "misses": 0}
    report = {
        "summary": {"csim": s, "style": {"error": "CLIP weights missing"}},
        "images": [{"file": "/x/a.png", "csim": 0.2}, {"file": "/x/b.png", "csim": None},
                   {"file": "/x/c.png", "csim": 0.4}, {"file": "/x/d.png", "csim": 0.6}],
        "config": {"face_backend": "dlib", "warnings": ["biased"], "notes": {}},
    }
    json_path, md_path = write_report(report, tmp_path / "out" / "report.json")
    assert json_path == tmp_path / "out" / "report.json" and md_path == tmp_path / "out" / "report.md"
    assert json.loads(json_path.read_text()) == report
    md = md_path.read_text()
    assert "| csim | 0.4000 | 0.1633 | 3 | 1 |" in md
    assert "| style | - | - | - | - | unavailable: CLIP weights missing |" in md
    assert "| b.png | - |" in md and "| d.png | 0.6000 |" in md and "- biased" in md


def test_cli_evaluate_writes_report(demo_sets, tmp_path, capsys):
    source, reference = demo_sets
    out = tmp_path / "r" / "report.json"
    code = main(["evaluate", "--generated", str(source), "--source", str(source), "--reference", str(reference),
                 "--metrics", "csim,style,clip_t", "--face-backend", "arcface:tiny", "--clip-model", "tiny",
                 "--prompts", "a photo of <v1> person", "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    report = json.loads(out.read_text())
    assert [m for m in report["summary"]] == ["csim", "style", "clip_t"]
    assert all(report["summary"][m]["n"] == 4 for m in report["summary"])
    assert out.with_suffix(".md").is_file() and "style:" in text.out


def test_cli_evaluate_errors_are_one_line(demo_sets, tmp_path, capsys):
    source, reference = demo_sets
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        ["--generated", str(tmp_path / "missing"), "--source", str(source)],
        ["--generated", str(source), "--source", str(tmp_path / "missing")],
        ["--generated", str(tmp_path / "empty")],
        ["--generated", str(source), "--metrics", "csim,bogus"],
        ["--generated", str(source), "--metrics", "clip_t", "--prompts", str(tmp_path / "bad.json")],
        ["--generated", str(source), "--metrics", "clip_t", "--prompts", str(tmp_path / "none.txt")],
        ["--generated", str(source), "--source", str(source), "--metrics", "csim", "--face-backend", "facenet",
         "--out", str(tmp_path / "o.json")],
        ["--generated", str(source), "--out", str(tmp_path)],
    ]
    for argv in cases:
        code = main(["evaluate", *argv])
        text = capsys.readouterr()
        assert code == 2, (argv, text)
        assert "Traceback" not in text.err + text.out
        lines = text.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, text.err)
