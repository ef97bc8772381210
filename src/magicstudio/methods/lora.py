"""Where LoRA goes, per preset, expressed as PEFT ``LoraConfig`` objects (PEFT does the adapting).

Target modules are full-name regexes (PEFT's rule for a string ``target_modules``):
- ``cross_attn`` (MagiCapture paper): the projection layers of the cross-attention modules.
- ``attn_ff`` (MagiCapture authors' code): q/k/v/out of self- and cross-attention and the GEGLU projection.
- ``tailor`` (MagicTailor): to_q/to_k/to_v/to_out.0, proj_in, proj_out, ff.net.2.
- ``text_attn``: the text encoder's self-attention projections.
"""

from __future__ import annotations

from peft import LoraConfig

from ..errors import UserError

TARGETS = {
    "cross_attn": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",
    "attn_ff": r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*ff\.net\.0\.proj",
    "tailor": r".*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*attentions\.\d+\.(proj_in|proj_out)|.*ff\.net\.2",
    "custom_diffusion": r".*attn2\.(to_k|to_v)",
    "text_attn": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",
}


def lora_config(targets: str, rank: int, alpha: float | None = None, dropout: float = 0.0) -> LoraConfig:
    if targets not in TARGETS:
        raise UserError(f"unknown LoRA targets {targets!r}; choose one of {', '.join(TARGETS)}")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=TARGETS[targets],
        lora_dropout=dropout,
    )


def lora_parameters(module) -> list:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def lora_module_names(module) -> list[str]:
    """Names of the modules that carry a LoRA adapter (to check placement)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n})
