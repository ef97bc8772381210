"""Export formats: a run folder must load with plain diffusers, and the A1111 files must be what A1111 reads.

The LoRA is deliberately trained with ``lora_alpha != r`` on the UNet (scale 2): if the adapter metadata is lost
anywhere, diffusers reloads it at scale 1 and the outputs no longer match.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from magicstudio.errors import UserError
from magicstudio.training.export import (
    A1111_DIR,
    EMBEDDINGS_DIR,
    LORA_FILE,
    RunWeights,
    embedding_name,
    export_a1111,
    load_run_into_pipeline,
    read_lora,
    save_embeddings,
    save_lora,
)
from magicstudio.training.lora import add_lora
from magicstudio.models import load_base
from magicstudio.models.schedulers import make_scheduler
from magicstudio.models.tiny import write_tiny

TOKENS = ["<v1>", "<v2>"]
UNET_TARGETS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_R, UNET_ALPHA = 4, 8
TE_R, TE_ALPHA = 4, 4
PROMPT = "a photo of <v1> with <v2>"
ATOL = 1e-5


def randomize_lora_b(module: torch.nn.Module, generator: torch.Generator, std: float = 0.3) -> int:
    """LoRA B starts at zero (no effect); give it random values so the adapter changes the outputs."""
    n = 0
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LoraLayer) and "default" in layer.lora_B:
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=generator) * std)
                n += 1
    return n


def fixed_inputs(comps):
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(1, 4, comps.latent_size, comps.latent_size, generator=g)
    context = torch.randn(1, 77, comps.unet.config.cross_attention_dim, generator=g)
    return latents, context


@torch.no_grad()
def unet_output(unet, latents, context) -> torch.Tensor:
    return unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample


@torch.no_grad()
def outputs(pipe, latents, context, decode: bool = False) -> SimpleNamespace:
    """UNet output on fixed inputs, text-encoder output of PROMPT, and a 3-step generation (seed 0, CFG).

    The generation is compared in latent space (what UNet and text encoder produce); ``decode`` also runs the
    VAE, which the LoRA does not touch, for a pixel-level check.
    """
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    image = pipe(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    pixels = pipe.vae.decode(image / pipe.vae.config.scaling_factor).sample if decode else None
    return SimpleNamespace(
        unet=unet_output(pipe.unet, latents, context), text=pipe.text_encoder(ids)[0], image=image, pixels=pixels
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def fresh_pipeline(tiny_dir, scheduler_config):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny SD with two placeholder tokens and a LoRA on UNet cross-attention + text encoder, saved as a run."""
    comps = load_base("tiny")
    tok, te = comps.tokenizer, comps.text_encoder
    tok.add_tokens(TOKENS)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    ids = tok.convert_tokens_to_ids(TOKENS)
    g = torch.Generator().manual_seed(7)
    dim = te.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(len(TOKENS), dim, generator=g)
    with torch.no_grad():
        te.get_input_embeddings().weight[ids] = vectors

    comps.unet.add_adapter(LoraConfig(r=UNET_R, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS))
    add_lora(te, LoraConfig(r=TE_R, lora_alpha=TE_ALPHA, target_modules=TE_TARGETS))  # PEFT itself (compat.py)
    n_unet, n_te = randomize_lora_b(comps.unet, g), randomize_lora_b(te, g)
    assert n_unet == 40 and n_te == 8  # 10 attn2 blocks x 4 projections; 2 CLIP layers x 4 projections

    pipe = comps.pipeline(scheduler=make_scheduler("ddim", comps.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    latents, context = fixed_inputs(comps)
    ref = outputs(pipe, latents, context, decode=True)

    run = tmp_path_factory.mktemp("run")
    lora_path = save_lora(run, comps.unet, te)
    emb_paths = save_embeddings(run, TOKENS, vectors)
    a1111 = export_a1111(run, name="subject")
    return SimpleNamespace(
        comps=comps, run=run, ref=ref, vectors=vectors, latents=latents, context=context,
        lora_path=lora_path, emb_paths=emb_paths, a1111=a1111, sched=comps.scheduler.config,
    )


def assert_close(a, b, what):
    assert a.shape == b.shape, what
    assert torch.allclose(a, b, atol=ATOL, rtol=1e-4), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def assert_differs(a, b, what, margin=1e-3):
    assert (a - b).abs().max().item() > margin, f"{what} should differ (is the LoRA/embedding having an effect?)"


# ------------------------------------------------------------------------------------------------- run folder


def test_run_folder_layout(trained):
    run = trained.run
    assert trained.lora_path == run / LORA_FILE
    assert trained.emb_paths == [run / EMBEDDINGS_DIR / "v1.safetensors", run / EMBEDDINGS_DIR / "v2.safetensors"]
    assert trained.a1111.lora == run / A1111_DIR / "subject_lora.safetensors"
    assert trained.a1111.embeddings == [run / A1111_DIR / "v1.safetensors", run / A1111_DIR / "v2.safetensors"]
    assert not [p for p in run.rglob(".*")], "temporary files left behind"


def test_diffusers_lora_file_carries_adapter_metadata(trained):
    with safe_open(str(trained.lora_path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == UNET_R and meta["unet.lora_alpha"] == UNET_ALPHA
    assert meta["text_encoder.r"] == TE_R and meta["text_encoder.lora_alpha"] == TE_ALPHA
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys
    # The canonical SD text-encoder layout, which diffusers maps onto old and flattened CLIPTextModel alike.
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * (40 + 8)


def test_plain_diffusers_reproduces_the_run(trained, tiny_dir):
    """Fresh pipeline + load_lora_weights(run) + load_textual_inversion per file == the trained model."""
    pipe = fresh_pipeline(tiny_dir, trained.sched)
    base = unet_output(pipe.unet, trained.latents, trained.context)  # before loading anything
    pipe.load_lora_weights(str(trained.run))
    # One file without token=: the file must name its token itself.
    pipe.load_textual_inversion(str(trained.emb_paths[0]))
    pipe.load_textual_inversion(str(trained.emb_paths[1]), token=TOKENS[1])

    table = pipe.text_encoder.get_input_embeddings().weight
    for token, vec in zip(TOKENS, trained.vectors):
        ids = pipe.tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, f"{token} is not a single token: {ids}"
        assert torch.equal(table[ids[0]].detach(), vec)

    got = outputs(pipe, trained.latents, trained.context, decode=True)
    assert_differs(base, trained.ref.unet, "UNet output without LoRA")
    assert_close(got.unet, trained.ref.unet, "UNet output")
    assert_close(got.text, trained.ref.text, "text encoder output")
    assert_close(got.image, trained.ref.image, "3-step generation (latents)")
    assert_close(got.pixels, trained.ref.pixels, "3-step generation (decoded image)")


def test_load_run_into_pipeline(trained, tiny_dir):
    pipe = fresh_pipeline(tiny_dir, trained.sched)
    tokens = load_run_into_pipeline(pipe, trained.run)
    assert tokens == TOKENS
    got = outputs(pipe, trained.latents, trained.context)
    assert_close(got.image, trained.ref.image, "3-step generation")


def test_metadata_is_what_keeps_the_scale(trained, tiny_dir, tmp_path):
    """Negative control: the same tensors without the adapter metadata reload at scale 1 and do NOT match."""
    stripped = tmp_path / LORA_FILE
    save_file(load_file(str(trained.lora_path)), str(stripped), metadata={"format": "pt"})
    pipe = fresh_pipeline(tiny_dir, trained.sched)
    pipe.load_lora_weights(str(tmp_path))
    unet = unet_output(pipe.unet, trained.latents, trained.context)
    assert_differs(unet, trained.ref.unet, "UNet output of a LoRA reloaded without metadata")


def test_embedding_files(trained):
    for path, token, vec in zip(trained.emb_paths, TOKENS, trained.vectors):
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()) == [token]  # diffusers TI convention {token: tensor}
            assert f.metadata()["token"] == token
            t = f.get_tensor(token)
        assert t.shape == (1, vec.shape[0]) and torch.equal(t[0], vec)


def test_module_without_peft_config_and_per_layer_patterns(tiny_dir, tmp_path):
    """A module carrying LoRA layers but no ``peft_config`` (older PEFT's ``inject_adapter_in_model``): the config
    is rebuilt from the layers, including a layer with its own rank and alpha; plain diffusers and the kohya file
    both reproduce it."""
    comps = load_base("tiny")
    special = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    config = LoraConfig(r=2, lora_alpha=6, target_modules=UNET_TARGETS, rank_pattern={special: 3}, alpha_pattern={special: 1.5})
    unet = inject_adapter_in_model(config, comps.unet)
    del unet.peft_config
    randomize_lora_b(unet, torch.Generator().manual_seed(3))
    latents, context = fixed_inputs(comps)
    ref = unet_output(unet, latents, context)
    save_lora(tmp_path, unet)
    lora = read_lora(tmp_path)
    assert set(lora.tensors) == {"unet"}
    assert lora.configs["unet"]["lora_alpha"] == 6 and lora.configs["unet"]["rank_pattern"] == {special: 3}
    assert lora.scale("unet", special) == 0.5 and lora.scale("unet", special.replace("mid_block", "down_blocks.0")) == 3

    pipe = fresh_pipeline(tiny_dir, comps.scheduler.config)
    pipe.load_lora_weights(str(tmp_path))
    assert_close(unet_output(pipe.unet, latents, context), ref, "UNet output (diffusers file)")

    files = export_a1111(RunWeights(lora=lora), tmp_path)
    sd = load_file(str(files.lora))
    kohya_special = "lora_unet_" + special.replace(".", "_")
    assert sd[f"{kohya_special}.alpha"].item() == 1.5 and sd[f"{kohya_special}.lora_down.weight"].shape[0] == 3
    # A1111/ComfyUI apply each kohya module as W += up @ down * alpha / rank: that must equal PEFT's update.
    # (diffusers' own kohya loader cannot be the judge here: with per-module alphas it builds an alpha_pattern
    # key "...attn2.processor.to_k_lora.down.weight" that matches nothing, and loads that layer at the wrong scale.)
    for name, layer in unet.named_modules():
        if isinstance(layer, LoraLayer):
            key = "lora_unet_" + name.replace(".", "_")
            down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
            kohya_delta = up @ down * (alpha / down.shape[0])
            peft_delta = layer.get_delta_weight("default")
            assert torch.allclose(kohya_delta, peft_delta, atol=1e-7), name


# ------------------------------------------------------------------------------------------------- A1111 / kohya

KOHYA_KEY = re.compile(r"^(lora_unet|lora_te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def test_kohya_file_format(trained):
    path = trained.a1111.lora
    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    bad = [k for k in sd if not KOHYA_KEY.match(k)]
    assert not bad, bad[:5]
    for key in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_q",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
    ):
        assert f"{key}.lora_down.weight" in sd, key

    downs = [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]
    assert len(downs) == 48 and len(sd) == 3 * 48
    for name in downs:
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        r, expected_alpha = (UNET_R, UNET_ALPHA) if name.startswith("lora_unet_") else (TE_R, TE_ALPHA)
        assert down.shape[0] == r and up.shape[1] == r
        assert alpha.dim() == 0 and alpha.item() == expected_alpha, name

    # lora_down/lora_up are PEFT's A/B of the same layer.
    peft = load_file(str(trained.lora_path))
    assert torch.equal(
        sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"],
        peft["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"],
    )
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8"  # the most common alpha (UNet); each module carries its own
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"


def test_kohya_file_round_trips_through_diffusers(trained, tiny_dir):
    """diffusers' own kohya loader turns the file back into the same model (UNet and text encoder)."""
    pipe = fresh_pipeline(tiny_dir, trained.sched)
    pipe.load_lora_weights(str(trained.a1111.lora))
    for path in trained.emb_paths:
        pipe.load_textual_inversion(str(path))
    got = outputs(pipe, trained.latents, trained.context)
    assert_close(got.unet, trained.ref.unet, "UNet output")
    assert_close(got.text, trained.ref.text, "text encoder output")
    assert_close(got.image, trained.ref.image, "3-step generation")


def test_a1111_embeddings(trained):
    for path, token, vec in zip(trained.a1111.embeddings, TOKENS, trained.vectors):
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()) == ["emb_params"]
            meta = f.metadata()
            t = f.get_tensor("emb_params")
        assert t.shape == (1, vec.shape[0]) and torch.equal(t[0], vec)
        assert meta["token"] == token and meta["name"] == path.stem


def test_export_a1111_from_modules(trained, tmp_path):
    """Explicit inputs give the same files as the run folder."""
    weights = RunWeights.from_modules(trained.comps.unet, trained.comps.text_encoder, TOKENS, trained.vectors)
    files = export_a1111(weights, tmp_path, name="subject")
    a, b = load_file(str(files.lora)), load_file(str(trained.a1111.lora))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(files.embeddings, trained.a1111.embeddings):
        assert torch.equal(load_file(str(p))["emb_params"], load_file(str(q))["emb_params"])


# ------------------------------------------------------------------------------------------------- errors and names


def test_names_and_errors(tmp_path):
    assert embedding_name("<v1>") == "v1"
    assert embedding_name("<sks dog/cat>") == "sks_dog_cat"
    with pytest.raises(UserError):
        embedding_name("<>")
    with pytest.raises(UserError):
        save_embeddings(tmp_path, ["<a>", "a"], torch.zeros(2, 4))  # same file name
    with pytest.raises(UserError):
        save_embeddings(tmp_path, ["<a>"], torch.zeros(2, 4))  # count mismatch
    comps = load_base("tiny")
    with pytest.raises(UserError):
        save_lora(tmp_path, comps.unet, comps.text_encoder)  # no adapter
    with pytest.raises(UserError):
        load_run_into_pipeline(None, tmp_path / "empty")
    with pytest.raises(UserError):
        export_a1111(RunWeights(), tmp_path)
