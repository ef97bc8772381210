"""Custom Diffusion (Kumari et al. 2023, arXiv 2212.04488) as MagiCapture's paper ran it as a baseline.

Trains the key and value projections of every cross-attention layer (``attn2.to_k`` / ``attn2.to_v``: the only
weights that see the text) and the modifier tokens ``<v1>`` (identity) and ``<v2>`` (style), initialised from
rare words as in the original ("ktn", "pll"). Paper supplement: prior preservation with lambda 1.0 and 200
class images, batch 2 (one source + one reference image, each with a class image), lr 5e-6, 750 steps,
sampling with 50 steps at guidance 7.5. Like the original: AdamW (weight decay 1e-2), constant lr, clip 1.0.

Export: the K/V updates are full-rank, but an update ``W' - W`` is exactly a LoRA of rank ``min(out, in)``
(``B A`` from its SVD), so the run folder holds a standard diffusers LoRA on ``attn2.to_k/to_v`` (per-layer rank
and alpha in the file's adapter metadata) and the two embeddings: plain ``load_lora_weights`` +
``load_textual_inversion`` rebuild the trained model. ``export_rank`` truncates the SVD (the original paper's
compression) instead.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ...training.runs import RunDir
from ...training.loop import Phase
from ...training.registry import MethodSpec, register
from .common import Baseline, BaselineConfig, make_baseline_config, run_baseline

NAME = "custom-diffusion"

PRESETS: dict[str, dict] = {
    "paper": dict(steps=750, lr=5e-6, prior=True, prior_weight=1.0, num_class_images=200, v1_init="ktn",
                  v2_init="pll", weight_decay=1e-2, grad_clip=1.0, hflip=True, checkpoint_every=250),
    "smoke": dict(model="tiny", steps=40, lr=1e-3, prior=True, prior_weight=1.0, num_class_images=4, class_steps=5,
                  v1_init="ktn", v2_init="pll", weight_decay=1e-2, grad_clip=1.0, checkpoint_every=20,
                  sample_steps=5),
}


def kv_layers(unet) -> dict[str, torch.nn.Linear]:
    """``{"<block>.attn2.to_k": Linear, "<block>.attn2.to_v": Linear, ...}``: the cross-attention K/V projections."""
    out = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            out[f"{name}.to_k"] = module.to_k
            out[f"{name}.to_v"] = module.to_v
    return out


def delta_as_lora(layers: dict[str, torch.nn.Linear], initial: dict[str, torch.Tensor], rank: int | None = None):
    """The updates ``W - W0`` of ``layers`` as a diffusers-style LoRA (``LoraWeights``), via SVD: exact at full
    rank (``rank=None``), the best rank-``rank`` approximation otherwise."""
    from ...training.export import LoraWeights

    tensors, ranks = {}, {}
    for name, layer in layers.items():
        delta = layer.weight.detach().double().cpu() - initial[name].double().cpu()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(delta.shape) if rank is None else max(1, min(rank, min(delta.shape)))
        root = s[:r].sqrt()
        tensors[f"{name}.lora_B.weight"] = (u[:, :r] * root).float().contiguous()
        tensors[f"{name}.lora_A.weight"] = (root[:, None] * vh[:r]).float().contiguous()
        ranks[name] = r
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    config = {  # scale alpha / r = 1 on every layer
        "r": r0, "lora_alpha": r0,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != r0},
        "target_modules": sorted(ranks), "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "init_lora_weights": True,
    }
    return LoraWeights(tensors={"unet": tensors}, configs={"unet": config})


class CustomDiffusion(Baseline):
    wrap_tokens = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kv = kv_layers(self.comps.unet)
        self.kv_initial = {n: layer.weight.detach().clone() for n, layer in self.kv.items()}

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [Phase("custom_diffusion", cfg.steps, self._setup, cfg.lr_schedule, cfg.weight_decay, cfg.grad_clip,
                      cfg.lr_warmup_steps)]

    def _setup(self) -> list[dict]:
        weights = [layer.weight for layer in self.kv.values()]
        for w in weights:
            w.requires_grad_(True)
        return [{"params": weights + [self.embedding.rows], "lr": self.cfg.lr}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state()
        state.update({f"kv.{n}": layer.weight.detach().clone() for n, layer in self.kv.items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(state)
        with torch.no_grad():
            for n, layer in self.kv.items():
                layer.weight.copy_(state[f"kv.{n}"])

    def export(self, run: RunDir) -> None:
        from ...training.export import _write_diffusers_lora, export_a1111

        self.save_tokens(run)
        _write_diffusers_lora(run.path, delta_as_lora(self.kv, self.kv_initial, self.cfg.export_rank))
        export_a1111(run.path)


def make_config(preset: str = "paper", **overrides) -> BaselineConfig:
    return make_baseline_config(NAME, PRESETS, preset, **overrides)


def train(source, reference, out, preset: str = "paper", seed: int = 0, *, resume: bool = False,
          progress: bool = False, **overrides) -> Path:
    """Train Custom Diffusion on the source (``<v1>``) and reference (``<v2>``) folders into run folder ``out``."""
    cfg = make_config(preset, seed=seed, **overrides)
    return run_baseline(CustomDiffusion, source, reference, out, cfg, resume=resume, progress=progress).path


register(MethodSpec(NAME, BaselineConfig, PRESETS, train, make_config, fixed=("method", "preset"),
                    doc=(__doc__ or "").split("\n")[0]))

__all__ = ["NAME", "PRESETS", "CustomDiffusion", "delta_as_lora", "kv_layers", "make_config", "train"]
