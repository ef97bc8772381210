"""Saving nested training state (optimizer, RNG, counters) without pickle.

A nested structure of dicts/lists/tuples/scalars/tensors is split into its tensors, written to one
safetensors file, and a JSON skeleton that names them. Loading reverses it. Used for checkpoints, so every
file magicstudio writes is safetensors or plain text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..io import atomic_write, load_tensors, save_tensors

_T = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def _split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj
        return {_T: key}
    if isinstance(obj, dict):
        intkeys = all(isinstance(k, int) for k in obj) and len(obj) > 0
        out = {str(k): _split(v, tensors, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()}
        if intkeys:
            out[_INTKEYS] = True
        return out
    if isinstance(obj, tuple):
        return {_TUPLE: [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} at {prefix!r}")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _T in obj:
            return tensors[obj[_T]]
        if _TUPLE in obj:
            return tuple(_join(v, tensors) for v in obj[_TUPLE])
        intkeys = obj.get(_INTKEYS, False)
        return {(int(k) if intkeys else k): _join(v, tensors) for k, v in obj.items() if k != _INTKEYS}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(path_stem: str | Path, state: Any) -> None:
    """Write ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (structure)."""
    stem = Path(path_stem)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "")
    # safetensors refuses tensors that share memory; clone to be safe (states are small: LoRA + a few rows).
    save_tensors(stem.with_suffix(".safetensors"), {k: v.detach().clone() for k, v in tensors.items()})
    text = json.dumps(skeleton)
    atomic_write(stem.with_suffix(".json"), lambda p: p.write_text(text))


def load_state(path_stem: str | Path) -> Any:
    stem = Path(path_stem)
    tensors = load_tensors(stem.with_suffix(".safetensors"))
    path = stem.with_suffix(".json")
    try:
        skeleton = json.loads(path.read_text(encoding="utf-8"))
        return _join(skeleton, tensors)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the checkpoint is incomplete; delete {stem.parent} to resume from the "
                        "one before it") from None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}); delete {stem.parent} to resume from the one "
                        "before it") from None
