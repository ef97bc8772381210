"""``magicstudio toyworld attributes``: can the pretrained toy model draw the people and styles it is told?

Prompted with every attribute of an identity and a style in words (``world.describe_person`` /
``world.describe_style``, the form half of the pretraining captions take), the base model generates images; the toy
identity and style encoders (trained on the world's labels, never on generated images) classify them, and the
share of images whose predicted attribute equals the prompted one is that attribute's accuracy. Two sets:
*held-in* = random pretraining identities and styles, *held-out* = the held-out ones (combinations the model never
saw). Chance level is 1/K for an attribute with K values (e.g. 0.17 for the six skin tones).
"""

from __future__ import annotations

import numpy as np
import torch

from ...data import toyworld as world


def attribute_prompt(identity: world.Identity, style: world.Style) -> str:
    return f"a photo of {world.describe_person(identity)} {world.describe_style(style)}"


@torch.no_grad()
def attribute_accuracy(n_prompts: int = 24, images_per_prompt: int = 2, steps: int = 25, guidance: float = 5.0,
                       seed: int = 0, progress: bool = False) -> dict:
    """Per-attribute accuracy of the base model on held-in and held-out (identity, style) prompts.

    Returns ``{"held-in": {attr: acc}, "held-out": {attr: acc}, "chance": {attr: 1/K}, "n_images": {...}}``.
    """
    from ...models.base import load_base
    from ...models.toyworld import ToyEmbedder, load_toy_encoders

    comps = load_base("toyworld")
    pipe = comps.pipeline(scheduler=comps.inference_scheduler("ddim"))
    nets = load_toy_encoders()
    readers = {"identity": ToyEmbedder("identity", nets["identity"]), "style": ToyEmbedder("style", nets["style"])}
    rng = np.random.default_rng([seed, 11])
    unseen = min(world.N_HELD_OUT, comps.extra.get("held_out", world.N_HELD_OUT))  # the pairs this model never saw
    sets = {
        "held-in": [(world.random_identity(rng), world.random_style(rng)) for _ in range(n_prompts)],
        "held-out": [(world.HELD_OUT_IDENTITIES[i % unseen], world.HELD_OUT_STYLES[(i * 5 + 1) % unseen])
                     for i in range(n_prompts)],
    }
    attrs = {"identity": list(world.IDENTITY_ATTRS), "style": list(world.STYLE_ATTRS)}
    result: dict = {"chance": {a: round(1 / len(v), 3) for a, v in {**world.IDENTITY_ATTRS, **world.STYLE_ATTRS}.items()},
                    "prompts": n_prompts, "images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance}
    for name, pairs in sets.items():
        hits: dict[str, list[bool]] = {a: [] for a in attrs["identity"] + attrs["style"]}
        for k, (ident, style) in enumerate(pairs):
            images = pipe(prompt=[attribute_prompt(ident, style)] * images_per_prompt, num_inference_steps=steps,
                          guidance_scale=guidance, height=64, width=64,
                          generator=torch.Generator().manual_seed(seed + 1000 * k)).images
            truth = {"identity": ident.labels(), "style": style.labels()}
            for kind in ("identity", "style"):
                pred = readers[kind].predict(images)
                for j, a in enumerate(attrs[kind]):
                    hits[a] += [bool(p == truth[kind][j]) for p in pred[j].tolist()]
            if progress:
                print(f"  {name} {k + 1}/{len(pairs)}", flush=True)
        result[name] = {a: round(float(np.mean(h)), 3) for a, h in hits.items()}
    return result


def markdown(result: dict) -> str:
    names = list(result["chance"])
    lines = ["| prompts | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in ("held-in", "held-out", "chance"):
        lines.append(f"| {row} | " + " | ".join(f"{result[row][a]:.2f}" for a in names) + " |")
    return "\n".join(lines) + "\n"
