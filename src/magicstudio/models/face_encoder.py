"""Face-recognition encoders: the network R of MagiCapture's identity loss (Eq. 7).

``L_id = 1 - cos(R(B(x0_hat)), R(B(I_s)))``. A :class:`FaceEncoder` takes faces already aligned by B
(:mod:`magicstudio.models.face_align`) and returns unit-length embeddings, so the cosine is a dot product. Encoders
are frozen (eval mode, no parameter gradients) but differentiable with respect to their input, which is how the
identity gradient reaches the diffusion model.

The authors' R is insightface ``arcface_torch`` iresnet100 (MS1MV3); any published ``backbone.pth`` (r18 ... r200)
loads, as a restricted pickle or converted to ``.safetensors``.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..io import load_tensors
from .iresnet import IRESNET_LAYERS, IResNet

TINY_LAYERS = (1, 1, 1, 1)
TINY_WIDTH = 16
TINY_FEATURES = 64

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


class FaceEncoder(nn.Module, ABC):
    """Frozen face embedder: ``embed(aligned [B, 3, input_size, input_size] in [-1, 1]) -> [B, D]``, unit norm."""

    input_size: int = 112
    name: str = "face-encoder"
    embedding_dim: int

    @abstractmethod
    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of aligned RGB faces in ``[-1, 1]``; differentiable with respect to the input."""

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        return self.embed(aligned)

    def train(self, mode: bool = True) -> "FaceEncoder":
        """Always stays in eval mode: BatchNorm statistics must never change (and never depend on the batch)."""
        return super().train(False)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()


class ArcFaceEncoder(FaceEncoder):
    """insightface ArcFace IResNet as a frozen :class:`FaceEncoder` (input RGB ``(x/255 - 0.5)/0.5``, 112x112)."""

    def __init__(self, backbone: IResNet, name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.embedding_dim = backbone.num_features
        self._freeze()

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if aligned.dim() != 4 or tuple(aligned.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.name} expects aligned faces [B, 3, {size}, {size}], got {tuple(aligned.shape)}")
        weight = self.backbone.conv1.weight
        features = self.backbone(aligned.to(device=weight.device, dtype=weight.dtype))
        return F.normalize(features, dim=-1)

    @classmethod
    def tiny(cls, seed: int = 0) -> "ArcFaceEncoder":
        """A small randomly initialised IResNet (same structure, ``[1,1,1,1]`` blocks, width 16, 64-d) for tests."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = IResNet(TINY_LAYERS, width=TINY_WIDTH, num_features=TINY_FEATURES)
        return cls(backbone, name=f"arcface-tiny(seed={seed})")

    @classmethod
    def from_weights(
        cls,
        path: str | os.PathLike,
        arch: str = "auto",
        device: torch.device | str = "cpu",
    ) -> "ArcFaceEncoder":
        """Load an arcface_torch ``backbone.pth`` (tensor-only pickle) or ``.safetensors`` state dict.

        ``arch``: ``"auto"`` reads the blocks per stage, width and embedding size from the keys and shapes; or one
        of ``"r18"``, ``"r34"``, ``"r50"``, ``"r100"``, ``"r200"`` to insist on a published architecture. Raises
        :class:`UserError` if the file is missing, unreadable, or not a matching IResNet state dict.
        """
        state = _strip_prefix(load_tensors(path), "module.")
        if arch == "auto":
            layers, width, features = _infer_config(state, path)
        elif arch in IRESNET_LAYERS:
            layers, width, features = IRESNET_LAYERS[arch], 64, 512
        else:
            raise UserError(f"unknown ArcFace arch {arch!r}; use auto, {', '.join(IRESNET_LAYERS)}")
        with torch.device("meta"):
            backbone = IResNet(layers, width=width, num_features=features)
        _check_state(backbone.state_dict(), state, path, _arch_name(layers, width, features))
        backbone = backbone.to_empty(device=device)
        backbone.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (checked above)
        for name, buf in backbone.named_buffers():
            if name.endswith("num_batches_tracked") and name not in state:
                buf.zero_()
        backbone.features.weight.requires_grad_(False)
        return cls(backbone, name=f"arcface-{_arch_name(layers, width, features)}")


def load_face_encoder(
    spec: str | os.PathLike | FaceEncoder | None,
    arch: str = "auto",
    device: torch.device | str = "cpu",
) -> FaceEncoder | None:
    """Face encoder from a user setting: ``None`` -> ``None`` (the caller warns that the identity loss is off);
    ``"tiny"`` or ``"tiny:SEED"`` -> random tiny ArcFace; ``"toyworld[:PATH]"`` -> the toy world's face network; a path -> :meth:`ArcFaceEncoder.from_weights`."""
    if spec is None or isinstance(spec, FaceEncoder):
        return spec
    text = str(spec)
    if text == "toyworld" or text.startswith("toyworld:"):  # the toy world's face network (models/toyworld.py)
        from .toyworld import ToyFaceEncoder, load_toy_encoders

        return ToyFaceEncoder(load_toy_encoders(text.partition(":")[2] or None)["face"]).to(device)
    if text == "tiny" or text.startswith("tiny:"):
        seed = text.partition(":")[2] or "0"
        if not seed.isdigit():
            raise UserError(f"bad face encoder spec {text!r}: use tiny or tiny:SEED with an integer seed")
        return ArcFaceEncoder.tiny(int(seed)).to(device)
    return ArcFaceEncoder.from_weights(spec, arch=arch, device=device)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a DistributedDataParallel ``module.`` prefix when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _arch_name(layers: tuple[int, ...], width: int, features: int) -> str:
    for name, published in IRESNET_LAYERS.items():
        if tuple(layers) == published and width == 64 and features == 512:
            return name
    return f"iresnet{list(layers)}-w{width}-d{features}"


def _infer_config(state: dict[str, torch.Tensor], path: str | os.PathLike) -> tuple[tuple[int, ...], int, int]:
    """Blocks per stage, stem width and embedding size of an IResNet state dict (``UserError`` if it is not one)."""
    missing = [k for k in ("conv1.weight", "fc.weight") if k not in state]
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks[int(match.group(1))].add(int(match.group(2)))
    missing += [f"layer{i}.*" for i, found in blocks.items() if not found]
    if missing:
        sample = ", ".join(sorted(state)[:5]) or "none"
        raise UserError(
            f"{path} is not an ArcFace IResNet state dict: missing {', '.join(missing)} (first keys found: {sample})"
        )
    gaps = [f"layer{i}" for i, found in blocks.items() if found != set(range(len(found)))]
    if gaps:
        raise UserError(f"{path} is not an ArcFace IResNet state dict: block numbering has gaps in {', '.join(gaps)}")
    conv1, fc = state["conv1.weight"], state["fc.weight"]
    if conv1.dim() != 4 or fc.dim() != 2:
        raise UserError(f"{path}: conv1.weight / fc.weight have shapes {tuple(conv1.shape)} / {tuple(fc.shape)}")
    return tuple(len(blocks[i]) for i in range(1, 5)), int(conv1.shape[0]), int(fc.shape[0])


def _check_state(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | os.PathLike, arch: str
) -> None:
    """``UserError`` listing missing / unexpected keys and shape mismatches against the built architecture."""

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (file vs model): {listing(shapes)}")
    if problems:
        raise UserError(f"{path} does not match ArcFace IResNet {arch}: " + "; ".join(problems))
