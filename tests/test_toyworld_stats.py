"""The toy world's statistics and captions: the table's intervals and paired verdicts on the paper's claims, the
captions that teach the base model the people it must draw, and the attribute-accuracy measurement."""

from __future__ import annotations

import numpy as np
import pytest

from magicstudio.data import toyworld as world
from magicstudio.experiments.toyworld import table as T


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.5, 0.1, 6), rng.normal(0.5, 0.1, 60)
    lo, hi = T.bootstrap_ci(list(few))
    assert lo < few.mean() < hi and hi - lo < 0.25
    for v in (few, many):  # the width is the normal approximation's 2 x 1.96 x sd / sqrt(n), within sampling error
        lo, hi = T.bootstrap_ci(list(v))
        assert 0.6 < (hi - lo) / (2 * 1.96 * v.std() / np.sqrt(len(v))) < 1.3
    assert T.bootstrap_ci([0.3]) == (0.3, 0.3)


def test_stats_average_pairs_not_images():
    """A pair with many images must not outweigh a pair with few: the unit is the pair."""
    s = T._stats({"pair-0": [1.0] * 10, "pair-1": [0.0, 0.0], "pair-2": [float("nan"), 0.5]})
    assert s["mean"] == pytest.approx(0.5) and s["pairs"] == 3
    assert T._stats({"pair-0": [None]})["mean"] is None


def test_paired_comparison_verdicts_and_direction():
    pairs = [f"pair-{i}" for i in range(12)]
    rng = np.random.default_rng(1)
    base = {p: [float(v)] for p, v in zip(pairs, rng.uniform(0.2, 0.8, 12))}
    up = {p: [v[0] + 0.05] for p, v in base.items()}  # better on every pair, by less than the spread between pairs
    assert T.compare(up, base)["verdict"] == "better"  # paired: the pair-to-pair spread cancels
    assert T.compare(base, up)["verdict"] == "worse"
    assert T.compare(up, base, higher_is_better=False)["verdict"] == "worse"  # e.g. spill: lower is better
    noisy = {p: [v[0] + float(e)] for (p, v), e in zip(base.items(), rng.normal(0, 0.1, 12))}
    noisy = {p: [v[0] - np.mean([n[0] - b[0] for n, b in zip(noisy.values(), base.values())])] for p, v in noisy.items()}
    assert T.compare(noisy, base)["verdict"] == "cannot tell"
    c = T.compare(up, base)
    assert c["diff"] == pytest.approx(0.05) and c["ci"][0] == pytest.approx(0.05) and c["pairs"] == 12


def test_paper_claims_say_confirms_contradicts_or_cannot_tell():
    pairs = [f"pair-{i}" for i in range(6)]
    row = lambda v: {p: [v + 0.01 * i] for i, p in enumerate(pairs)}  # noqa: E731
    values = {"magicapture": {"csim": row(0.8), "style": row(0.3), "spill": row(0.4)},
              "magicapture-no-ar": {"csim": row(0.8), "style": row(0.5), "spill": row(0.9)},
              "dreambooth": {"csim": row(0.4), "style": row(0.5), "spill": row(0.9)}}
    got = {(c["a"], c["b"], c["metric"]): c["says"] for c in T.paper_claims(values)}
    assert got[("magicapture", "dreambooth", "csim")] == "confirms"
    assert got[("magicapture", "dreambooth", "style")] == "contradicts"
    assert got[("magicapture", "magicapture-no-ar", "spill")] == "confirms"  # lower spill is the claim
    assert got[("magicapture", "magicapture-no-ar", "csim")] == "cannot tell"
    assert not any("custom-diffusion" in k for k in got)  # rows that were not run are not claimed
    md = T.markdown({"rows": [], "claims": T.paper_claims(values), "pairs": pairs, "images_per_pair": 1,
                     "sampling_steps": 1, "guidance": 1.0, "seed": 0, "failed": []})
    assert "| magicapture < magicapture-no-ar | spill |" in md and "contradicts" in md


def test_described_captions_name_every_identity_attribute_half_of_the_time():
    rng = np.random.default_rng(0)
    full, n = 0, 400
    for _ in range(n):
        ident, style = world.random_identity(rng), world.random_style(rng)
        cap = world.described_caption(ident, style, rng)
        assert world.describe_person(ident) not in world.caption(ident, style, rng)  # alt-text: never all
        if world.describe_person(ident) in cap:
            full += 1
    assert 0.4 < full / n < 0.6
    ident = world.HELD_OUT_IDENTITIES[0]
    words = world.describe_person(ident)
    for value in (ident.hair, ident.hairstyle, ident.eyes, ident.skin, ident.face):
        assert value in words
    assert len(set(world.HELD_OUT_IDENTITIES)) == len(set(world.HELD_OUT_STYLES)) == world.N_HELD_OUT
    _, caps, _, _ = world.pretraining_batch(np.random.default_rng(3), 40, captions="described")
    assert sum("eyes, " in c and " skin and " in c for c in caps) >= 10


def test_pretraining_dataset_cache_is_rebuilt_when_its_recipe_changes(tmp_path):
    """The encoded pictures are cached for resumes; a cache made with other captions must not be reused silently."""
    from safetensors import safe_open

    from magicstudio.experiments.toyworld.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vae_steps=2, ldm_steps=2, data_size=8, vae_batch=2, ldm_batch=2, checkpoint_every=10,
                         captions="alt-text")
    pretrain(tmp_path / "w", tmp_path / "d", cfg, progress=False, stages=("vae", "ldm"))
    meta = lambda: safe_open(str(tmp_path / "w" / "dataset.safetensors"), framework="pt").metadata()  # noqa: E731
    assert meta()["captions"] == "alt-text"
    cfg.captions, cfg.ldm_steps = "described", 3
    pretrain(tmp_path / "w", tmp_path / "d", cfg, progress=False, stages=("ldm",))
    assert meta()["captions"] == "described"


def test_attribute_prompt_tokens_are_in_the_stored_token_rows():
    """The measurement's prompts use only words whose token rows the compact model file stores (else it would
    prompt with untrained random rows and measure nothing)."""
    from magicstudio.experiments.toyworld.attributes import attribute_prompt
    from magicstudio.experiments.toyworld.pretrain import used_token_ids
    from magicstudio.models.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer()
    stored = set(used_token_ids(tok))
    for i in range(world.N_HELD_OUT):
        ids = tok(attribute_prompt(world.HELD_OUT_IDENTITIES[i], world.HELD_OUT_STYLES[i])).input_ids
        assert set(ids) <= stored


def test_the_first_six_held_out_pairs_are_the_first_models_and_twelve_are_never_drawn():
    """The held-out set grew to 12 pairs; the first six must stay those the first shipped model excluded (its figures
    and the demo's pair 0 refer to them), and pretraining must draw none of the twelve."""
    assert world.N_HELD_OUT == 12
    assert world.HELD_OUT_IDENTITIES[0].describe() == "round face, dark skin, blonde short hair, grey eyes, glasses"
    assert world.HELD_OUT_IDENTITIES[5].describe() == "oval face, light skin, blue bun hair, brown eyes, glasses"
    assert world.HELD_OUT_STYLES[0].describe() == "checkered teal background, shirt"
    assert world.HELD_OUT_STYLES[5].describe() == "dotted pink background, shirt"
    rng = np.random.default_rng(4)
    drawn_ids = {world.random_identity(rng) for _ in range(3000)}
    drawn_styles = {world.random_style(rng) for _ in range(3000)}
    assert not drawn_ids & set(world.HELD_OUT_IDENTITIES)
    assert not drawn_styles & set(world.HELD_OUT_STYLES)
    assert len(drawn_styles) == 6 * 6 * 3 - 12  # every other style does occur


def test_the_collared_shirt_is_visible_below_the_head_window():
    """The style encoder never sees the head window, where the collar is; the shirt's placket must tell a collared
    shirt from a plain one below it (the first world's style encoder read clothes at 0.40)."""
    ident = world.HELD_OUT_IDENTITIES[0]
    below = slice(world.HEAD_WINDOW[0].stop, None)
    pics = {c: world.render(ident, world.Style("plain", "teal", c), jitter=False).image[below].astype(int)
            for c in world.CLOTHES}
    assert np.abs(pics["collared shirt"] - pics["shirt"]).max() > 100
    assert np.abs(pics["collared shirt"] - pics["suit"]).max() > 100


def test_offset_noise_gives_each_picture_and_channel_its_own_mean():
    import torch

    from magicstudio.experiments.toyworld.pretrain import training_noise

    g = torch.Generator().manual_seed(0)
    plain = training_noise((512, 4, 16, 16), 0.0, g)
    offset = training_noise((512, 4, 16, 16), 0.1, g)
    # spatial means: std 1/16 for white noise, sqrt(0.1^2 + 1/256) = 0.118 with the offset
    assert plain.mean((2, 3)).std().item() == pytest.approx(1 / 16, rel=0.1)
    assert offset.mean((2, 3)).std().item() == pytest.approx((0.01 + 1 / 256) ** 0.5, rel=0.1)
    assert offset.std().item() == pytest.approx((1 + 0.01) ** 0.5, rel=0.02)


def test_vae_loss_weights_face_above_head_above_background():
    from magicstudio.experiments.toyworld.pretrain import PretrainConfig, vae_pixel_weight

    p = world.render(world.HELD_OUT_IDENTITIES[1], world.HELD_OUT_STYLES[1], jitter=False)
    cfg = PretrainConfig(vae_head_weight=4.0, vae_face_weight=8.0)
    w = vae_pixel_weight([p.masks["head"]], [p.masks["face"]], cfg)[0, 0].numpy()
    face, head = p.masks["face"] > 0, p.masks["head"] > 0
    assert np.allclose(w[face], 13.0) and np.allclose(w[head & ~face], 5.0) and np.allclose(w[~head], 1.0)


def test_model_files_record_their_text_width_and_held_out_pairs(tmp_path):
    """A new model is 128 wide and never saw 12 pairs; the first model's file (no such metadata) loads 64 wide with 6,
    and the table refuses pairs the model in use saw in pretraining."""
    from magicstudio.errors import UserError
    from magicstudio.models import toyworld as tw

    comps = tw.build_toyworld(seed=0, text_width=128)
    path = tw.save_toyworld(comps, tmp_path / "ldm.safetensors", [320, 49406, 49407])
    loaded = tw.load_toyworld(path)
    assert loaded.text_encoder.config.hidden_size == 128 and loaded.unet.config.cross_attention_dim == 128
    assert tw.held_out_pairs(path) == 12 and loaded.extra["held_out"] == 12
    first = tw.toyworld_weights()
    if first.is_file() and tw.held_out_pairs(first) == 6:
        assert tw.load_toyworld(first).text_encoder.config.hidden_size == 64
        with pytest.raises(UserError, match="never saw"):
            T.run_table(tmp_path / "t", n_pairs=7, quick=True, progress=False)
