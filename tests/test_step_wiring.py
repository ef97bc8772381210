"""Wiring of every loss term into one training step (issue 13), read through the step's own record
(``StepOutput.record``: what each term received), never by re-implementing the step.

Toy world: the pictures' face masks come from the generator (``magicstudio.data.toyworld``), the model is the toy
LDM (``load_base("toyworld")``), the face network the toy one. Flip and colour jitter are off so that a drawn
image is the concept set's image ``index`` itself. For each task of each method: which image (index into which
concept set), which mask, which tokens, which prompt, which timestep range; the total is the weighted sum of the
recorded terms; raising one weight by ``d`` moves the step's gradient by exactly ``d`` x that term's gradient;
each term has a gradient on the LoRA and on the token rows it names, none on the others.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from magicstudio.data import toyworld as world
from magicstudio.data.masks import downsample_mask
from magicstudio.training.concepts import ConceptSet, load_concept

SIZE = world.SIZE  # 64 px toy pictures, 8x8 latents
D = 0.75  # the weight increment of the exactness tests


@pytest.fixture(scope="module")
def toy_master():
    from magicstudio.models import load_base

    return load_base("toyworld")


@pytest.fixture
def toy(toy_master):
    return copy.deepcopy(toy_master)


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    """(source portraits, reference portraits, source ConceptSet, reference ConceptSet): held-out pair 0."""
    root = tmp_path_factory.mktemp("toy")
    src = world.concept_set("identity", 0, n=4)
    ref = world.concept_set("style", 0, n=4)
    s = world.write_concept_set(src, root / "source", "source")
    r = world.write_concept_set(ref, root / "reference", "reference")
    return src, ref, load_concept(s, SIZE), load_concept(r, SIZE)


def true_face(portraits, index, latent: int) -> torch.Tensor:
    """The generator's face mask of picture ``index`` at the latent size (independent of the concept set)."""
    m = torch.from_numpy((portraits[index].masks["face"] > 0).astype(np.float32))[None, None]
    return downsample_mask(m, latent)


def capture(toy, toy_sets, **overrides):
    from magicstudio.methods.magicapture import make_config
    from magicstudio.methods.magicapture.train import MagiCapture
    from magicstudio.models.face_encoder import load_face_encoder

    settings = dict(model="toyworld", resolution=SIZE, face_encoder="toyworld", hflip=False, color_jitter=0.0,
                    ar_layers="res:2", decode_precision="fp32", ti_steps=10, lora_steps=20)
    cfg = make_config("smoke", **(settings | overrides))
    enc = load_face_encoder("toyworld") if cfg.mode == "portrait" else None
    return MagiCapture(cfg, toy, toy_sets[2], toy_sets[3], enc)


def step_with(m, phase: str, task: str, step: int, tries: int = 60):
    """The first micro-step of ``task``; returns (output, generator state before it) so it can be replayed."""
    for _ in range(tries):
        state = m.generator.get_state()
        out = m.micro_step(phase, step)
        if out.task == task:
            return out, state
    raise AssertionError(f"no {task} step in {tries} draws")


def grads(value: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]


def flat(gs) -> torch.Tensor:
    return torch.cat([g.flatten() for g in gs])


def lora_params(m):
    from magicstudio.training.lora import lora_parameters

    return lora_parameters(m.comps.unet)


def row_grads(m, value) -> tuple[float, float]:
    """|grad| of ``value`` on the <v1> row and on the <v2> row."""
    g = grads(value, [m.embedding.rows])[0]
    return float(g[0].abs().sum()), float(g[1].abs().sum())


def check_total(out):
    total = sum(t.weight * t.value for t in out.record.values())
    assert torch.allclose(out.loss, total, rtol=1e-6, atol=1e-8), (out.loss, total)


def check_weight(m, phase, task, step, name, field, delta=D, per_term=None):
    """Raise ``cfg.<field>`` by ``delta``: the step's gradient moves by ``delta`` x ``per_term`` (default: the
    gradient of term ``name``)."""
    params = lora_params(m) + [m.embedding.rows] if phase == "lora" else [m.embedding.rows]
    out, state = step_with(m, phase, task, step)
    g0 = flat(grads(out.loss, params))
    term = flat(grads(per_term(out) if per_term else out.record[name].value, params))
    base = m.cfg
    m.cfg = replace(base, **{field: getattr(base, field) + delta})
    try:
        m.generator.set_state(state)
        out2 = m.micro_step(phase, step)
    finally:
        m.cfg = base
    assert out2.task == task
    g1 = flat(grads(out2.loss, params))
    assert term.abs().sum() > 0, f"{name}: no gradient at all"
    assert torch.allclose(g1 - g0, delta * term, rtol=1e-3, atol=1e-7 + 1e-4 * float(term.abs().max())), name


# ----------------------------------------------------------------------------------------------------------------
# MagiCapture, phase 2 (Eq. 10), portrait
# ----------------------------------------------------------------------------------------------------------------


def test_capture_source_task_wiring(toy, toy_sets):
    m = capture(toy, toy_sets)
    m._setup_lora()
    out, _ = step_with(m, "lora", "source", 10)
    rec = out.record
    assert set(rec) == {"source", "attn_v1"}  # no style token, no identity loss on the source task
    s = rec["source"]
    assert s.concept == "source" and s.mask_kind == "face"
    # Eq. 4: the face mask of that very source picture (the generator's mask, not the loss's own)
    assert torch.equal(s.mask, true_face(toy_sets[0], s.index, m.latent_size))
    assert s.tokens == ("<v1>",) and "<v1>" in s.prompt and "<v2>" not in s.prompt
    assert s.t_range == (0, m.cfg.lora_t_max) and 0 <= int(s.t) < m.cfg.lora_t_max
    a = rec["attn_v1"]  # Eq. 8: <v1> held to the face mask
    assert a.tokens == ("<v1>",) and torch.equal(a.mask, s.mask) and a.weight == m.cfg.lambda_attn
    check_total(out)
    # reach: the LoRA and <v1>'s row, never <v2>'s (not in the prompt)
    for term in rec.values():
        assert flat(grads(term.value, lora_params(m))).abs().sum() > 0
        v1, v2 = row_grads(m, term.value)
        assert v1 > 0 and v2 == 0


def test_capture_reference_task_wiring(toy, toy_sets):
    m = capture(toy, toy_sets)
    m._setup_lora()
    out, _ = step_with(m, "lora", "reference", 10)
    rec = out.record
    assert set(rec) == {"reference", "attn_v2"}
    r = rec["reference"]
    face = true_face(toy_sets[1], r.index, m.latent_size)
    assert r.concept == "reference" and r.mask_kind == "non-face"
    assert face.sum() > 0 and torch.equal(r.mask, 1 - face)  # Eq. 5: the non-face region of that reference
    assert r.tokens == ("<v2>",) and "<v2>" in r.prompt and "<v1>" not in r.prompt
    assert torch.equal(rec["attn_v2"].mask, 1 - face) and rec["attn_v2"].tokens == ("<v2>",)
    check_total(out)
    for term in rec.values():
        assert flat(grads(term.value, lora_params(m))).abs().sum() > 0
        v1, v2 = row_grads(m, term.value)
        assert v1 == 0 and v2 > 0


def test_capture_composed_task_wiring(toy, toy_sets):
    m = capture(toy, toy_sets)
    m._setup_lora()
    out, _ = step_with(m, "lora", "composed", 10)
    rec = out.record
    assert set(rec) == {"composed", "attn_v1", "attn_v2", "id"}
    c = rec["composed"]
    face = true_face(toy_sets[1], c.index, m.latent_size)
    # Eq. 6: the reference image is the pseudo-label, with its non-face mask, under the composed prompt
    assert c.concept == "reference" and c.mask_kind == "non-face" and torch.equal(c.mask, 1 - face)
    assert c.tokens == ("<v1>", "<v2>") and "<v1>" in c.prompt and "<v2>" in c.prompt
    # one UNet pass serves L_c and L_id ("shared"): t ~ U[0, T')
    t_hi = min(m.cfg.lora_t_max, m.cfg.t_id_max)
    assert c.t_range == (0, t_hi) and 0 <= int(c.t) < t_hi
    # Eq. 8 in the composed task: <v1> -> the face, <v2> -> the non-face region, each half of lambda_attn
    assert torch.equal(rec["attn_v1"].mask, face) and rec["attn_v1"].tokens == ("<v1>",)
    assert torch.equal(rec["attn_v2"].mask, 1 - face) and rec["attn_v2"].tokens == ("<v2>",)
    assert rec["attn_v1"].weight == rec["attn_v2"].weight == m.cfg.lambda_attn / 2
    # Eq. 7: the identity target is the source set's identity, weight lambda_id
    i = rec["id"]
    assert i.concept == "source" and i.weight == m.cfg.lambda_id and i.t_range == (0, m.cfg.t_id_max)
    assert 0 < float(i.value.detach()) <= 2  # L_id = 1 - cos enters as itself (a subtracted term would be negative)
    check_total(out)
    for name, term in rec.items():
        assert flat(grads(term.value, lora_params(m))).abs().sum() > 0, name
        v1, v2 = row_grads(m, term.value)
        assert v1 > 0 and v2 > 0, name


def test_capture_identity_term_enters_with_plus_lambda_and_its_gradient(toy, toy_sets):
    """Eq. 10: + lambda_id * L_id (not subtracted, not detached): the step's gradient moves by exactly
    d x grad(L_id) when lambda_id grows by d; the same for lambda_attn (x the mean of the AR terms)."""
    m = capture(toy, toy_sets)
    m._setup_lora()
    check_weight(m, "lora", "composed", 10, "id", "lambda_id")
    check_weight(m, "lora", "composed", 10, "attn", "lambda_attn",
                 per_term=lambda out: (out.record["attn_v1"].value + out.record["attn_v2"].value) / 2)
    check_weight(m, "lora", "source", 10, "attn_v1", "lambda_attn")


def test_capture_early_doubling_counts_reference_and_composed_only(toy, toy_sets):
    """Official preset: the reference and composed losses count ``early_ref_comp_weight`` times in the first half
    of phase 2 (step - ti_steps < lora_steps / 2), the source loss never, and nothing in the second half."""
    m = capture(toy, toy_sets, early_ref_comp_weight=2.0)
    m._setup_lora()
    first, second = m.cfg.ti_steps + 1, m.cfg.ti_steps + m.cfg.lora_steps // 2
    for task in ("reference", "composed"):
        assert step_with(m, "lora", task, first)[0].record[task].weight == 2.0
        assert step_with(m, "lora", task, second)[0].record[task].weight == 1.0
        check_weight(m, "lora", task, first, task, "early_ref_comp_weight")
    assert step_with(m, "lora", "source", first)[0].record["source"].weight == 1.0


# ----------------------------------------------------------------------------------------------------------------
# MagiCapture, phase 1 (Eq. 9)
# ----------------------------------------------------------------------------------------------------------------


def test_capture_phase1_trains_only_the_new_rows_with_reconstruction(toy, toy_sets):
    m = capture(toy, toy_sets)
    groups = m._setup_ti()
    assert [p for g in groups for p in g["params"]] == [m.embedding.rows]
    assert not any(p.requires_grad for p in m.comps.unet.parameters())
    assert not any(p.requires_grad for n, p in m.comps.text_encoder.named_parameters() if not n.endswith("rows"))
    for task, mask_kind, rows in (("source", "face", (True, False)), ("reference", "non-face", (False, True))):
        out, _ = step_with(m, "textual_inversion", task, 0)
        assert set(out.record) == {task}  # Eq. 9: no AR, no composed task, no identity loss in phase 1
        term = out.record[task]
        portraits = toy_sets[0] if task == "source" else toy_sets[1]
        face = true_face(portraits, term.index, m.latent_size)
        assert term.mask_kind == mask_kind and torch.equal(term.mask, face if task == "source" else 1 - face)
        assert term.t_range == (0, m.cfg.ti_t_max)
        v1, v2 = row_grads(m, term.value)
        assert (v1 > 0, v2 > 0) == rows
        out.loss.backward()
        assert all(p.grad is None for p in m.comps.unet.parameters())
        m.embedding.rows.grad = None


def test_capture_official_norm_pull_in_phase1_only(toy, toy_sets):
    """--clip_ti_decay (METHODS.md): after a phase-1 step each row's norm moves toward 0.4 by min(1, 100 lr) of
    the gap, its direction kept; phase 2 leaves the rows alone."""
    m = capture(toy, toy_sets, ti_norm_target=0.4)
    with torch.no_grad():
        m.embedding.rows.mul_(3.0)
    before = m.embedding.rows.detach().clone()
    m.after_optimizer_step("textual_inversion", 2e-3)
    after = m.embedding.rows.detach()
    n0, n1 = before.norm(dim=-1), after.norm(dim=-1)
    assert torch.allclose(n1, n0 + 0.2 * (0.4 - n0), rtol=1e-5)  # lambda = min(1, 100 * 2e-3) = 0.2
    assert torch.allclose(torch.nn.functional.cosine_similarity(before, after, dim=-1), torch.ones(2), atol=1e-6)
    m.after_optimizer_step("lora", 2e-3)
    assert torch.equal(m.embedding.rows.detach(), after)


# ----------------------------------------------------------------------------------------------------------------
# MagiCapture, general objects (supplement, Eq. 11)
# ----------------------------------------------------------------------------------------------------------------


def test_capture_object_mode_wiring(toy, toy_sets):
    m = capture(toy, toy_sets, mode="object", dino_model="tiny", object_class="person")
    m._setup_lora()
    out, _ = step_with(m, "lora", "source", 10)
    s = out.record["source"]
    assert set(out.record) == {"source", "attn_v1"}
    assert torch.equal(s.mask, true_face(toy_sets[0], s.index, m.latent_size))  # the source's foreground mask
    out, _ = step_with(m, "lora", "reference", 10)
    r = out.record["reference"]
    assert set(out.record) == {"reference"} and r.mask_kind == "none" and bool((r.mask == 1).all())  # unmasked
    out, _ = step_with(m, "lora", "composed", 10)
    rec = out.record
    assert set(rec) == {"ssim", "contra", "style"}  # Eq. 11 replaces the pseudo-label reconstruction
    assert rec["ssim"].concept == rec["contra"].concept == "source"  # structure from a source picture
    assert rec["style"].concept == "reference"  # style from the drawn reference
    cfg = m.cfg
    assert (rec["ssim"].weight, rec["contra"].weight, rec["style"].weight) == (
        cfg.lambda_ssim, cfg.lambda_contra, cfg.lambda_style)
    assert rec["ssim"].t_range == (0, min(cfg.lora_t_max, cfg.t_id_max))
    check_total(out)
    for name, term in rec.items():
        assert flat(grads(term.value, lora_params(m))).abs().sum() > 0, name
    for name, field in (("style", "lambda_style"), ("ssim", "lambda_ssim"), ("contra", "lambda_contra")):
        check_weight(m, "lora", "composed", 10, name, field)


# ----------------------------------------------------------------------------------------------------------------
# Baselines: DreamBooth (prior preservation), Textual Inversion, Custom Diffusion
# ----------------------------------------------------------------------------------------------------------------


def class_set() -> ConceptSet:
    """Four pictures of other (pretraining) people standing in for the base model's class images."""
    rng = np.random.default_rng(5)
    imgs = [world.render(world.random_identity(rng), world.random_style(rng), rng).image for _ in range(4)]
    x = torch.from_numpy(np.stack(imgs).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    return ConceptSet(x, torch.zeros(4, 1, SIZE, SIZE), torch.full((4, 5, 2), float("nan")),
                      torch.full((4, 4), float("nan")), [f"class-{i}" for i in range(4)])


def baseline(name, toy, toy_sets, **overrides):
    from magicstudio.methods.baselines import custom_diffusion, dreambooth, textual_inversion

    mod = {"dreambooth": dreambooth, "textual-inversion": textual_inversion, "custom-diffusion": custom_diffusion}[name]
    cls = {"dreambooth": dreambooth.DreamBooth, "textual-inversion": textual_inversion.TextualInversion,
           "custom-diffusion": custom_diffusion.CustomDiffusion}[name]
    cfg = mod.make_config("smoke", model="toyworld", resolution=SIZE, hflip=False, color_jitter=0.0, **overrides)
    m = cls(cfg, toy, toy_sets[2], toy_sets[3], class_set() if cfg.prior else None)
    groups = m.phases()[0].setup()
    return m, [p for g in groups for p in g["params"]]


def check_baseline_batch(m, out):
    cfg, rec = m.cfg, out.record
    assert rec["source"].concept == "source" and all(cfg.v1 in p and cfg.v2 not in p for p in rec["source"].prompt)
    assert rec["reference"].concept == "reference"
    assert all(cfg.v2 in p and cfg.v1 not in p for p in rec["reference"].prompt)
    assert rec["source"].tokens == (cfg.v1,) and rec["reference"].tokens == (cfg.v2,)
    assert rec["source"].weight == rec["reference"].weight == 0.5  # L_instance: the mean over both concepts
    assert all(t.t_range == (0, cfg.t_max) and bool((t.t < cfg.t_max).all()) for t in rec.values())
    check_total(out)


def test_dreambooth_prior_preservation_wiring(toy, toy_sets):
    m, params = baseline("dreambooth", toy, toy_sets)
    out = m.micro_step("dreambooth", 0)
    rec = out.record
    assert set(rec) == {"source", "reference", "prior"}
    check_baseline_batch(m, out)
    p = rec["prior"]  # DreamBooth Eq. 2: class images under the class prompt, weight prior_weight
    assert p.concept == "class" and p.prompt == [m.cfg.class_prompt] * 2 and p.tokens == ()
    assert p.weight == m.cfg.prior_weight
    unet = [q for q in m.comps.unet.parameters()]
    te = [q for q in m.comps.text_encoder.parameters()]
    for name, term in rec.items():  # the whole UNet and text encoder train
        assert flat(grads(term.value, unet)).abs().sum() > 0 and flat(grads(term.value, te)).abs().sum() > 0, name
    # the rows: <v1> only from the source term, <v2> only from the reference term, neither from the prior
    table = m.comps.text_encoder.get_input_embeddings().weight
    v1, v2 = m.token_ids
    for name, (a, b) in {"source": (True, False), "reference": (False, True), "prior": (False, False)}.items():
        g = grads(rec[name].value, [table])[0]
        assert (bool(g[v1].abs().sum() > 0), bool(g[v2].abs().sum() > 0)) == (a, b), name
    # weight exactness: prior_weight + d moves the step's gradient by d x grad(L_prior)
    state = m.generator.get_state()
    out, g0 = m.micro_step("dreambooth", 0), None
    m.generator.set_state(state)
    out = m.micro_step("dreambooth", 0)
    sub = unet[:40]
    g0 = flat(grads(out.loss, sub))
    term = flat(grads(out.record["prior"].value, sub))
    m.cfg = replace(m.cfg, prior_weight=m.cfg.prior_weight + D)
    m.generator.set_state(state)
    out2 = m.micro_step("dreambooth", 0)
    g1 = flat(grads(out2.loss, sub))
    assert term.abs().sum() > 0
    assert torch.allclose(g1 - g0, D * term, rtol=1e-3, atol=1e-7 + 1e-4 * float(term.abs().max()))


def test_textual_inversion_wiring(toy, toy_sets):
    m, params = baseline("textual-inversion", toy, toy_sets)
    assert params == [m.embedding.rows]
    out = m.micro_step("textual_inversion", 0)
    assert set(out.record) == {"source", "reference"}
    check_baseline_batch(m, out)
    assert row_grads(m, out.record["source"].value) > (0, 0) and row_grads(m, out.record["source"].value)[1] == 0
    v1, v2 = row_grads(m, out.record["reference"].value)
    assert v1 == 0 and v2 > 0
    out.loss.backward()
    assert all(p.grad is None for p in m.comps.unet.parameters())


def test_custom_diffusion_wiring(toy, toy_sets):
    m, params = baseline("custom-diffusion", toy, toy_sets)
    kv = [layer.weight for layer in m.kv.values()]
    assert params == kv + [m.embedding.rows]
    out = m.micro_step("custom_diffusion", 0)
    rec = out.record
    assert set(rec) == {"source", "reference", "prior"}
    check_baseline_batch(m, out)
    assert rec["prior"].concept == "class" and rec["prior"].weight == m.cfg.prior_weight
    for name, term in rec.items():
        assert flat(grads(term.value, kv)).abs().sum() > 0, name
    assert row_grads(m, rec["source"].value)[0] > 0 and row_grads(m, rec["source"].value)[1] == 0
    assert row_grads(m, rec["reference"].value)[0] == 0 and row_grads(m, rec["reference"].value)[1] > 0
    assert row_grads(m, rec["prior"].value) == (0.0, 0.0)
    out.loss.backward()  # only the cross-attention K/V projections of the UNet get a gradient
    names = {id(w) for w in kv}
    assert all(p.grad is None for p in m.comps.unet.parameters() if id(p) not in names)


# ----------------------------------------------------------------------------------------------------------------
# MagicFace: RSA for the first alpha of the steps, then RBA (paper Sec. 3; METHODS.md)
# ----------------------------------------------------------------------------------------------------------------


def test_magicface_runs_rsa_then_rba(toy_master):
    from PIL import Image

    from magicstudio.methods.magicface import Concept, MagicFaceSampler, prepare_references

    p = world.render(world.HELD_OUT_IDENTITIES[1], world.HELD_OUT_STYLES[1], np.random.default_rng(0))
    q = world.render(world.HELD_OUT_IDENTITIES[2], world.HELD_OUT_STYLES[2], np.random.default_rng(1))
    refs = prepare_references([Concept("person", Image.fromarray(p.image), p.masks["face"]),
                               Concept("shirt", Image.fromarray(q.image), 255 - q.masks["head"])], SIZE)
    steps, alpha = 10, 0.4
    with MagicFaceSampler(copy.deepcopy(toy_master), "a photo of a person wearing a shirt", refs, steps=steps,
                          alpha=alpha) as sampler:
        sampler.sample(0)
        schedule = sampler.schedule
    n_rsa = round(alpha * steps)
    assert [s["mode"] for s in schedule] == ["rsa"] * n_rsa + ["rba"] * (steps - n_rsa)
    ts = [s["t"] for s in schedule]
    assert ts == sorted(ts, reverse=True)  # the RSA steps are the early (noisy) ones
    for s in schedule:
        kinds = {kind for _, kind, _ in s["ran"]}
        assert kinds == {s["mode"]}, s  # what the replaced layers actually ran
        assert len(s["ran"]) == len(sampler.layers)
    # RBA routes pixels by the previous step's segmentation
    assert sum(n for s in schedule[n_rsa:] for _, _, n in s["ran"]) > 0
