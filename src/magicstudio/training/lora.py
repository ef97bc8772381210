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


def add_lora(module, config: LoraConfig, adapter_name: str = "default") -> None:
    """Add a fresh LoRA adapter to ``module`` (a diffusers UNet or a transformers text encoder) with PEFT itself.

    ``peft.inject_adapter_in_model`` wraps the target layers; the config is recorded in ``module.peft_config`` as
    diffusers' and transformers' ``add_adapter`` do, so PEFT's state-dict helpers and the exports read it. Not
    transformers' ``add_adapter``: from transformers 5.24 it refuses PEFT < 0.22 (see ``compat.py``), while PEFT's
    own injection is the same operation without that check.
    """
    from peft import inject_adapter_in_model

    existing = dict(getattr(module, "peft_config", None) or {})
    if adapter_name in existing:
        raise UserError(f"the model already has a LoRA adapter named {adapter_name!r}")
    inject_adapter_in_model(config, module, adapter_name)
    module.peft_config = {**existing, adapter_name: config}
    if hasattr(module, "_hf_peft_config_loaded"):  # transformers' flag that the model carries adapters
        module._hf_peft_config_loaded = True


def lora_parameters(module) -> list:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def lora_module_names(module) -> list[str]:
    """Names of the modules that carry a LoRA adapter (to check placement)."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n})
