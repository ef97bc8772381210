"""Small file helpers shared by every layer: atomic writes and safe weight loading.

Everything magicstudio writes that holds tensors is safetensors; pickle files made by others (for example an
ArcFace ``backbone.pth``) are read with ``torch.load(weights_only=True)`` only, so loading never runs code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weights file: safetensors, or a pickle restricted to tensors (``weights_only``).

    A pickle that needs arbitrary classes to unpickle is refused with a reason: loading weights must never
    execute code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # corrupt header, truncated file, not safetensors at all
            raise UserError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}: {exc})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"refusing to load {path}: it is not a plain tensor checkpoint and unpickling it could run code "
                f"({exc.__class__.__name__}); convert it to .safetensors"
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{path} does not hold a flat dictionary of tensors")
        return obj
    raise UserError(f"unsupported weights format {path.suffix!r} for {path} (use .safetensors, .pt, .pth or .bin)")
