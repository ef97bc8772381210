"""The toy world: the generator's ground truth, the compact model file, the toy encoders and metrics, and the
pretrain / table commands end to end (a few steps: the path, not the results)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from magicstudio.data import toyworld as world
from magicstudio.errors import UserError
from magicstudio.models import toyworld as tw

SHIPPED = tw.toyworld_weights().is_file() and tw.toyworld_weights(tw.ENCODERS_FILE).is_file()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="the trained toy world is not in assets/toyworld")


def _render(ident, style, seed=3):
    return world.render(ident, style, np.random.default_rng(seed))


def test_render_is_deterministic_and_masks_nest():
    rng = np.random.default_rng(0)
    ident, style = world.random_identity(rng), world.random_style(rng)
    a, b = _render(ident, style), _render(ident, style)
    assert np.array_equal(a.image, b.image)
    face, head, person = (a.masks[k] > 0 for k in ("face", "head", "person"))
    assert face.sum() > 100 and (face <= head).all() and (head <= person).all() and person.sum() < 64 * 64
    # landmarks: the eyes, nose and mouth are on the face, eyes above the nose above the mouth
    lm = np.round(a.landmarks5).astype(int)
    assert all(face[y, x] for x, y in lm)
    assert lm[0, 0] < lm[1, 0] and lm[0, 1] < lm[2, 1] < lm[3, 1]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation (anti-aliased edges: a pixel partly covered by a shape changes without being in its mask)."""
    p = np.pad(mask > 0, 1)
    return np.max([p[1 + dy:65 + dy, 1 + dx:65 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def test_identity_attributes_live_in_the_head_and_style_outside_the_face():
    ident = world.HELD_OUT_IDENTITIES[0]
    style = world.HELD_OUT_STYLES[0]
    base = _render(ident, style)
    other_hair = next(h for h in world.HAIR_COLOURS if h != ident.hair)
    hair = _render(replace(ident, hair=other_hair), style)
    changed = np.abs(hair.image.astype(int) - base.image.astype(int)).sum(-1) > 0
    assert changed.any() and not changed[~_dilate(base.masks["head"])].any()  # hair colour: only in the head
    other_eyes = next(e for e in world.EYE_COLOURS if e != ident.eyes)
    eyes = _render(replace(ident, eyes=other_eyes), style)
    changed = np.abs(eyes.image.astype(int) - base.image.astype(int)).sum(-1) > 0
    assert changed.any() and not changed[~_dilate(base.masks["face"])].any()  # eye colour: only in the face
    other_palette = next(p for p in world.PALETTES if p != style.palette)
    restyled = _render(ident, replace(style, palette=other_palette))
    changed = np.abs(restyled.image.astype(int) - base.image.astype(int)).sum(-1) > 0
    inner_face = ~_dilate(base.masks["face"] == 0)
    assert changed[base.masks["head"] == 0].mean() > 0.5 and not changed[inner_face].any()


def test_held_out_identities_and_styles_never_drawn_for_pretraining():
    rng = np.random.default_rng(1)
    ids = {world.random_identity(rng) for _ in range(3000)}
    styles = {world.random_style(rng) for _ in range(3000)}
    assert not ids & set(world.HELD_OUT_IDENTITIES)
    assert not styles & set(world.HELD_OUT_STYLES)
    assert len(styles) > 80  # every other style combination does occur
    # every single attribute value of the held-out concepts does occur in pretraining
    for k in world.IDENTITY_ATTRS:
        assert {getattr(i, k) for i in world.HELD_OUT_IDENTITIES} <= {getattr(i, k) for i in ids}
    images, captions, id_labels, st_labels = world.pretraining_batch(np.random.default_rng(2), 16)
    assert images.shape == (16, 64, 64, 3) and len(captions) == 16 and id_labels.shape == (16, 6)
    assert all(c.startswith(("a ", "an ")) and "person" in c for c in captions)


def test_concept_sets_are_prepared_folders(tmp_path):
    from magicstudio.data.prepare import load_prepared

    src = world.write_concept_set(world.concept_set("identity", 2, 4), tmp_path / "src", "source", size=128)
    prepared = load_prepared(src)
    assert len(prepared) == 4 and prepared.size == 128
    item = prepared[0]
    face = item.load_mask("face") > 0
    assert face.shape == (128, 128)
    # landmarks scaled with the image (pixel centres at integers) still sit on the face
    assert all(face[int(round(y)), int(round(x))] for x, y in item.landmarks5)
    ref = world.concept_set("style", 2, 4)
    assert {p.style for p in ref} == {world.HELD_OUT_STYLES[2]}
    assert len({p.identity for p in ref}) > 1
    assert {p.identity for p in world.concept_set("identity", 2, 4)} == {world.HELD_OUT_IDENTITIES[2]}


def test_compact_model_file_roundtrip_and_sparse_rows(tmp_path):
    comps = tw.build_toyworld(seed=0)
    used = [320, 1125, 2533, 49406, 49407]
    with torch.no_grad():
        comps.unet.conv_in.weight.add_(0.5)
        comps.text_encoder.get_input_embeddings().weight[used] += 1.0
    path = tw.save_toyworld(comps, tmp_path / "ldm.safetensors", used)
    loaded = tw.load_toyworld(path)
    assert torch.allclose(loaded.unet.conv_in.weight, comps.unet.conv_in.weight, atol=1e-3)
    table = loaded.text_encoder.get_input_embeddings().weight
    assert torch.allclose(table[used], comps.text_encoder.get_input_embeddings().weight[used], atol=1e-3)
    assert torch.equal(table[5000], tw.initial_token_embedding(0)[5000])
    assert path.stat().st_size < 6e6
    # a trained row that is not declared used cannot be dropped silently
    with torch.no_grad():
        comps.text_encoder.get_input_embeddings().weight[777] += 1.0
    with pytest.raises(ValueError):
        tw.save_toyworld(comps, tmp_path / "bad.safetensors", used)


def test_missing_weights_are_one_line_errors(tmp_path, monkeypatch):
    from magicstudio.models.base import load_base
    from magicstudio.models.face_encoder import load_face_encoder

    monkeypatch.setenv("MAGICSTUDIO_TOYWORLD", str(tmp_path))
    with pytest.raises(UserError, match="toyworld pretrain"):
        load_base("toyworld")
    with pytest.raises(UserError, match="toyworld pretrain"):
        load_face_encoder("toyworld")
    (tmp_path / tw.LDM_FILE).write_bytes(b"not a model")
    with pytest.raises(Exception):
        load_base("toyworld")


@needs_shipped
def test_shipped_model_loads_and_encoders_read_held_out_pictures():
    comps = tw.load_toyworld()
    assert comps.resolution == 64 and comps.latent_size == 16
    nets = tw.load_toy_encoders()
    rng = np.random.default_rng(11)
    pics = [world.render(world.HELD_OUT_IDENTITIES[i % 6], world.HELD_OUT_STYLES[(i * 5) % 6], rng) for i in range(48)]
    emb = tw.ToyEmbedder("identity", nets["identity"])
    preds = emb.predict([p.image for p in pics])
    labels = torch.tensor([p.identity.labels() for p in pics])
    acc = [float((pr == labels[:, k]).float().mean()) for k, pr in enumerate(preds)]
    assert min(acc) > 0.85, acc
    st = tw.ToyEmbedder("style", nets["style"])
    labels = torch.tensor([p.style.labels() for p in pics])
    acc = [float((pr == labels[:, k]).float().mean()) for k, pr in enumerate(st.predict([p.image for p in pics]))]
    assert min(acc[:2]) > 0.85, acc  # pattern, palette; the collar hides in the blanked head window (docs)


@needs_shipped
def test_toy_metrics_separate_same_from_other(tmp_path):
    """toy-CSIM is higher for the same person than for others; toy-Style higher for the same style; the style
    score does not see the face (the head window is blanked)."""
    from magicstudio.evaluation import evaluate_images

    src = world.write_concept_set(world.concept_set("identity", 0, 5), tmp_path / "src", "source")
    ref = world.write_concept_set(world.concept_set("style", 0, 5), tmp_path / "ref", "reference")
    rng = np.random.default_rng(5)
    same = [world.render(world.HELD_OUT_IDENTITIES[0], world.HELD_OUT_STYLES[0], rng) for _ in range(4)]
    other = [world.render(world.HELD_OUT_IDENTITIES[3], world.HELD_OUT_STYLES[3], rng) for _ in range(4)]
    folders = {}
    for name, pics in (("same", same), ("other", other)):
        folders[name] = world.write_concept_set(pics, tmp_path / name, "source") / "images"

    def score(folder):
        rep = evaluate_images(folder, src, ref, metrics=["csim", "style"], face_backend="toyworld", clip_model="toyworld")
        return rep["summary"]["csim"]["mean"], rep["summary"]["style"]["mean"]

    c_same, s_same = score(folders["same"])
    c_other, s_other = score(folders["other"])
    assert c_same > c_other + 0.2 and s_same > s_other + 0.2
    # the style embedding ignores everything inside the head window
    emb = tw.ToyEmbedder("style", tw.load_toy_encoders()["style"])
    a = same[0].image.copy()
    b = a.copy()
    b[world.HEAD_WINDOW] = 255 - b[world.HEAD_WINDOW]
    assert torch.allclose(emb.image_embeddings([a]), emb.image_embeddings([b]))


@needs_shipped
def test_toy_face_encoder_is_a_face_encoder_with_gradients():
    from magicstudio.models.face_align import align_faces
    from magicstudio.models.face_encoder import FaceEncoder, load_face_encoder

    enc = load_face_encoder("toyworld")
    assert isinstance(enc, FaceEncoder)
    p = world.render(world.HELD_OUT_IDENTITIES[1], world.HELD_OUT_STYLES[1], np.random.default_rng(0))
    x = (torch.from_numpy(p.image).permute(2, 0, 1)[None].float() / 127.5 - 1).requires_grad_(True)
    aligned = align_faces(x, torch.tensor(p.landmarks5[None], dtype=torch.float32))
    e = enc(aligned)
    assert e.shape == (1, enc.embedding_dim) and torch.allclose(e.norm(dim=-1), torch.ones(1))
    e.sum().backward()
    assert x.grad.abs().sum() > 0


def test_pretrain_runs_and_resumes(tmp_path):
    from magicstudio.experiments.toyworld.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vae_steps=4, ldm_steps=4, data_size=64, encoder_steps=2, identity_encoder_steps=2, checkpoint_every=2,
                         vae_batch=4, ldm_batch=4, encoder_batch=8)
    s = pretrain(tmp_path / "work", tmp_path / "dest", cfg, progress=False)
    assert (tmp_path / "dest" / tw.LDM_FILE).is_file() and (tmp_path / "dest" / tw.ENCODERS_FILE).is_file()
    assert s["scaling_factor"] > 0
    comps = tw.load_toyworld(tmp_path / "dest" / tw.LDM_FILE)
    assert comps.vae.config.scaling_factor == pytest.approx(s["scaling_factor"])
    # the LDM stage resumes from its checkpoint (4 of 6 steps done -> 2 more)
    state = json.loads((tmp_path / "work" / "ldm-ckpt.json").read_text())
    assert "step" in json.dumps(state)
    cfg.ldm_steps = 6
    pretrain(tmp_path / "work", tmp_path / "dest", cfg, progress=False, stages=("ldm",))
    from magicstudio.training.state import load_state

    assert load_state(tmp_path / "work" / "ldm-ckpt")["step"] == 6


@needs_shipped
def test_table_quick_path(tmp_path):
    """One pair, a few training steps, two images: every method goes through the harness and the table is written."""
    from magicstudio.experiments.toyworld.table import run_table

    summary = run_table(tmp_path / "t", n_pairs=1, images=1, steps=2, quick=True, progress=False)
    assert not summary["failed"], summary["failed"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) >= {"magicapture", "dreambooth", "textual-inversion", "custom-diffusion", "ideal", "base"}
    for name, row in rows.items():
        assert row["csim"]["mean"] is not None and row["style"]["mean"] is not None
        if name not in ("ideal", "base"):
            assert 0.0 <= row["spill"]["mean"] <= 1.0
    assert rows["ideal"]["csim"]["mean"] > 0.8 and rows["ideal"]["style"]["mean"] > 0.8
    assert (tmp_path / "t" / "table.md").is_file() and (tmp_path / "t" / "grid.png").is_file()


@needs_shipped
def test_demo_runs_in_the_toy_world(tmp_path, capsys):
    """The README's first command, shortened: `magicstudio demo` on the toy world (a few training steps)."""
    from magicstudio.cli.main import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "6"]) == 0
    out = tmp_path / "demo"
    assert (out / "overview.png").is_file() and len(list((out / "generated").glob("*-attention.png"))) == 4
    assert "toy-CSIM" in capsys.readouterr().out and list((out / "magicface").glob("*.png"))


def test_table_settings_from_the_command_line():
    from magicstudio.experiments.bench import parse_set
    from magicstudio.experiments.toyworld.table import TOY_SETTINGS, table_overrides

    methods = ("magicapture", "magicapture-no-ar", "textual-inversion")
    extra = parse_set(["magicapture.lora_lr=5e-4", "checkpoint_every=7", "textual-inversion.lr=1e-3"])
    o = table_overrides(methods, TOY_SETTINGS, extra)
    for m in ("magicapture", "magicapture-no-ar"):  # "magicapture." reaches the ablations too
        assert o[m]["lora_lr"] == 5e-4 and o[m]["checkpoint_every"] == 7  # user settings beat the toy ones
        assert o[m]["face_encoder"] == "toyworld" and o[m]["lora_steps"] == TOY_SETTINGS["magicapture"]["lora_steps"]
    assert o["textual-inversion"] == {**TOY_SETTINGS["textual-inversion"], "checkpoint_every": 7, "lr": 1e-3}
    assert o["*"] == {"model": "toyworld", "deterministic": True, "checkpoint_every": 7}  # the toy table pins bit-reproducible runs
    with pytest.raises(UserError, match="dreambooth"):
        table_overrides(methods, TOY_SETTINGS, parse_set(["dreambooth.steps=3"]))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from magicstudio.cli.main import main

    for args in (["toyworld", "table", "--pairs", "13", "--out", str(tmp_path)],
                 ["toyworld", "pretrain", "--stage", "nope"],
                 ["toyworld", "table", "--methods", "nope", "--out", str(tmp_path / "x"), "--pairs", "1"],
                 ["demo", "--world", "mars"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
