"""Small file helpers shared by every layer: atomic writes and safe weight loading.

Everything magicstudio writes that holds tensors is safetensors; pickle files made by others (for example an
ArcFace ``backbone.pth``) are read with ``torch.load(weights_only=True)`` only, so loading never runs code.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
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
    """Write a safetensors file atomically, with its header in a fixed order (``canonical_safetensors``)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = canonical_safetensors(save(tensors, metadata=metadata))
    return atomic_write(path, lambda p: p.write_bytes(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written in a fixed order: the same tensors and metadata give
    the same bytes.

    The format is an 8-byte little-endian header length, the JSON header (``__metadata__`` and one entry per tensor
    with its dtype, shape and data offsets), padded with spaces to a multiple of 8, then the data. safetensors'
    writer orders the ``__metadata__`` keys at random on every save; here they are sorted, and the tensor entries
    follow in the order of their data. The data bytes are untouched.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered: dict[str, Any] = {}
    if meta:
        ordered["__metadata__"] = dict(sorted(meta.items()))
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def canonicalise_safetensors_file(path: str | os.PathLike) -> Path:
    """Rewrite a safetensors file written by another library (e.g. diffusers' ``save_lora_weights``) with its header
    in the fixed order of ``canonical_safetensors``, atomically."""
    path = Path(path)
    data = canonical_safetensors(path.read_bytes())
    return atomic_write(path, lambda p: p.write_bytes(data))


def read_pickle(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``); ``mmap`` maps a zip checkpoint
    instead of reading it. UserError that tells a damaged file apart from one that needs code to unpickle."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" on files that then fail anyway
            return torch.load(str(path), map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:
        if re.search(r"GLOBAL|allowlist|unrecognized function", str(exc)):  # torch's weights-only unpickler refused
            raise UserError(
                f"refusing to load {path}: it holds objects other than tensors and unpickling it could run code; "
                "convert it to .safetensors"
            ) from None
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint: it is damaged, truncated or not a checkpoint at all"
        ) from None


def claim_folder(out: str | os.PathLike, command: str) -> Path:
    """Make ``out`` the output folder of ``magicstudio <command>``, which may later replace what it wrote there.

    A marker file records the claim; an existing file, or a non-empty folder without the marker (somebody else's),
    is a UserError and nothing is changed."""
    out = Path(out)
    marker = out / f".magicstudio-{command}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise UserError(f"--out {out} already holds files `magicstudio {command}` did not make; choose a new or "
                        "empty folder (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"made by `magicstudio {command}`, which may replace this folder's contents\n")
    return out


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weights file: safetensors, or a pickle restricted to tensors (``weights_only``).

    A pickle that needs arbitrary classes to unpickle is refused with a reason: loading weights must never
    execute code from the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a weights file (.safetensors, .pt, .pth or .bin)")
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # corrupt header, truncated file, not safetensors at all
            raise UserError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}: {exc})") from None
    if path.suffix in PICKLE_SUFFIXES:
        obj = read_pickle(path)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{path} does not hold a flat dictionary of tensors")
        return obj
    raise UserError(f"unsupported weights format {path.suffix!r} for {path} (use .safetensors, .pt, .pth or .bin)")
