"""Base-model loading, the tiny model, the tokenizer and placeholder tokens."""

import json

import pytest
import torch

from magicstudio.errors import UserError
from magicstudio.models import load_base
from magicstudio.models.tokens import (PlaceholderEmbedding, TokenSpec, add_placeholder_tokens, make_trainable,
                                       merge_trainable)


def test_tokenizer_is_the_real_clip_bpe(tiny):
    tok = tiny.tokenizer
    assert len(tok) == 49408
    assert tok("a photo of a person").input_ids == [49406, 320, 1125, 539, 320, 2533, 49407]


def test_tiny_is_deterministic_and_sd15_shaped():
    a, b = load_base("tiny", seed=3), load_base("tiny", seed=3)
    for (na, pa), (_, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(pa, pb), na
    assert a.vae_scale == 8 and a.latent_size == 16
    assert a.unet.config.down_block_types[:3] == ("CrossAttnDownBlock2D",) * 3
    assert a.text_encoder.config.eos_token_id == 49407


def test_tiny_folder_loads_in_plain_diffusers_and_in_load_base(tmp_path):
    from diffusers import StableDiffusionPipeline

    from magicstudio.cli.main import main

    assert main(["tiny-model", "--out", str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "tiny"))
    img = pipe("a photo", num_inference_steps=5, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    comps = load_base(str(tmp_path / "tiny"))
    ref = load_base("tiny")
    assert torch.equal(comps.unet.conv_in.weight, ref.unet.conv_in.weight)
    assert comps.resolution == 128


@pytest.mark.parametrize("bad, words", [
    ("/nonexistent/folder/model", "not found"),
    ("no-such-org/no-such-model", "could not load"),
])
def test_load_base_errors_are_one_line(bad, words):
    with pytest.raises(UserError) as exc:
        load_base(bad)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_load_base_rejects_folders_and_files_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        load_base(str(tmp_path / "empty"))
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(UserError, match="no Stable Diffusion"):
        load_base(str(tmp_path / "lora.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable"):
        load_base(str(tmp_path / "junk.safetensors"))


def test_placeholder_tokens_init_and_single_ids(tiny):
    table = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = add_placeholder_tokens(tiny.tokenizer, tiny.text_encoder,
                                 [TokenSpec("<v1>", "person"), TokenSpec("<v2>", "noise:0.017")],
                                 generator=torch.Generator().manual_seed(0))
    assert ids == [49408, 49409]
    assert tiny.tokenizer.tokenize("a <v1> person in <v2> style")[1] == "<v1>"
    new = tiny.text_encoder.get_input_embeddings().weight
    assert torch.allclose(new[ids[0]], table[2533])  # "person"
    assert 0.005 < new[ids[1]].std().item() < 0.04
    assert torch.equal(new[:49408], table)
    with pytest.raises(UserError, match="already a word"):
        add_placeholder_tokens(tiny.tokenizer, tiny.text_encoder, [TokenSpec("person", "person")])


def test_trainable_rows_leave_every_other_row_bit_identical(tiny):
    ids = add_placeholder_tokens(tiny.tokenizer, tiny.text_encoder, [TokenSpec("<v1>", "person")])
    before = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    emb = make_trainable(tiny.text_encoder, ids)
    assert isinstance(emb, PlaceholderEmbedding)
    opt = torch.optim.AdamW([emb.rows], lr=0.1, weight_decay=0.1)
    inp = tiny.tokenizer("a photo of <v1> person", return_tensors="pt").input_ids
    for _ in range(3):
        opt.zero_grad()
        tiny.text_encoder(inp)[0].pow(2).mean().backward()
        opt.step()
    merge_trainable(tiny.text_encoder)
    after = tiny.text_encoder.get_input_embeddings().weight
    assert torch.equal(after[: ids[0]], before[: ids[0]])
    assert not torch.equal(after[ids[0]], before[ids[0]])


def test_pickle_weights_are_refused_when_they_need_code(tmp_path):
    from magicstudio.io import load_tensors

    import argparse

    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pth")  # unpickling it would need a class
    with pytest.raises(UserError, match="refusing"):
        load_tensors(tmp_path / "evil.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(load_tensors(tmp_path / "ok.pth")["w"], torch.ones(2))
