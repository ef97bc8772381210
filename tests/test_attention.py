"""Attention capture: same outputs as diffusers' SDPA, the right columns, gradients, layer selection."""

import torch

from magicstudio.attention.capture import AttentionStore, install_capture, select_layers, stack_token_maps


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def test_capture_matches_sdpa_and_records_only_chosen_layers(tiny):
    x, t, e = _inputs()
    with torch.no_grad():
        plain = tiny.unet(x, t, e).sample
    store = AttentionStore(token_index=torch.tensor([[5, 7], [3, -1]]))
    layers = select_layers(tiny.unet, "paper")
    install_capture(tiny.unet, store, layers)
    with torch.no_grad():
        captured = tiny.unet(x, t, e).sample
    assert torch.allclose(plain, captured, atol=1e-5)
    assert set(store.maps) == set(layers)
    m = store.maps[layers[0]]
    assert m.shape == (2, 2, 4, 4, 2)  # batch, heads, 4x4 (1/4 of the 16x16 latent), two tokens
    assert torch.all(m[1, ..., 1] == 0)  # absent token (-1) records nothing


def test_captured_columns_are_the_softmax_probabilities_of_those_tokens(tiny):
    x, t, e = _inputs()
    name = select_layers(tiny.unet, "paper")[0]
    attn = tiny.unet.get_submodule(name)
    seen = {}
    hook = attn.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(h=args[0], enc=kwargs.get("encoder_hidden_states")),
                                          with_kwargs=True)
    store = AttentionStore(token_index=torch.tensor([[5, 7], [3, 9]]))
    install_capture(tiny.unet, store, [name])
    with torch.no_grad():
        tiny.unet(x, t, e)
    hook.remove()
    h, enc = seen["h"], seen["enc"]
    q = attn.head_to_batch_dim(attn.to_q(h))
    k = attn.head_to_batch_dim(attn.to_k(enc))
    probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, -1).view(2, attn.heads, -1, 77)
    got = store.maps[name].flatten(2, 3)  # (B, heads, HW, K)
    assert torch.allclose(got[0, :, :, 0], probs[0, :, :, 5], atol=1e-6)
    assert torch.allclose(got[1, :, :, 1], probs[1, :, :, 9], atol=1e-6)


def test_captured_maps_carry_gradient_to_the_text_embedding(tiny):
    x, t, e = _inputs()
    e = e.clone().requires_grad_(True)
    store = AttentionStore(token_index=torch.tensor([[5], [5]]))
    install_capture(tiny.unet, store, select_layers(tiny.unet, "paper"))
    tiny.unet(x, t, e)
    stack_token_maps(store, 16).sum().backward()
    assert e.grad[:, 5].abs().sum() > 0


def test_layer_selection(tiny):
    paper = select_layers(tiny.unet, "paper")
    assert paper and all(n.startswith(("down_blocks.2", "up_blocks.1")) for n in paper)
    assert len(select_layers(tiny.unet, "all")) == 10
    assert all(n.startswith(("down_blocks.0", "up_blocks.3")) for n in select_layers(tiny.unet, "res:1"))
    assert all(n.endswith("attn1") for n in select_layers(tiny.unet, "all", kind="attn1"))
