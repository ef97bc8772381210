"""Precision and checkpointing of a frozen network a loss backpropagates through (MagiCapture: the VAE decoder of
Eqs. 7 and 11).

Its weights never change, so, as diffusers' training scripts do with the frozen VAE under mixed precision, it can
run in bfloat16 while everything trained stays in float32; only the gradient *through* it is affected (measured on
the SD VAE decoder architecture at a 20x21 latent window: about 2% relative error, cosine 0.9997 to the float32
gradient; tests/test_precision.py holds the tiny decoder to cosine > 0.99). ``auto``
picks bfloat16 where the device computes it natively (CUDA with bf16, or a CPU with AMX / AVX512-BF16, where the
SD decoder's forward+backward is ~4x faster) for networks large enough to gain from it, and float32 elsewhere:
emulated bfloat16 is slower, and on the tiny test models the casts cost more than the small convolutions save
(tiny decoder 17 ms in bf16 vs 12 ms in fp32).
``fp16`` is never chosen automatically: SD VAE decoders (SDXL's notoriously) can overflow in float16.
Deep face-recognition networks are kept in float32: through a 100-layer IResNet the bf16 gradient's cosine to
the float32 one is only ~0.98, for a saving of ~0.1 s.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 convolutions / matmuls in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


#: below this many parameters ``auto`` keeps float32 (the SD 1.x/2.x/XL VAE decoders have ~50 M)
AUTO_MIN_PARAMS = 5_000_000


def frozen_dtype(precision: str, device: torch.device | str, module: torch.nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for running the frozen ``module`` in ``precision`` on ``device``; ``None`` = float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        big = module is None or sum(p.numel() for p in module.parameters()) >= AUTO_MIN_PARAMS
        return torch.bfloat16 if big and native_bf16(device) else None
    return _DTYPES[precision]


def frozen_autocast(dtype: torch.dtype | None, device: torch.device | str):
    """Autocast context for a frozen network (a no-op for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def use_checkpointing(setting: str, module: torch.nn.Module) -> bool:
    """Whether to recompute the frozen ``module``'s blocks in backward instead of keeping their activations
    (``on`` / ``off``; ``auto``: for networks of at least ``AUTO_MIN_PARAMS``, where the activations are hundreds
    of MB and the recomputation costs little next to the allocation it saves; on tiny models it is pure overhead)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"unknown checkpointing setting {setting!r}; choose auto, on or off")
    if setting == "auto":
        return sum(p.numel() for p in module.parameters()) >= AUTO_MIN_PARAMS
    return setting == "on"


def conv_input(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Channels-last input for reduced-precision convolution stacks (oneDNN's fast layout on CPU; another ~1.5x
    on the SD decoder); float32 inputs are left as they are, so float32 results stay bit-identical."""
    return x if dtype is None else x.contiguous(memory_format=torch.channels_last)
