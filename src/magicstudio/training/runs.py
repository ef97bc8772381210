"""The run folder: the contract between training, generation, exports, evaluation and the UI.

    RUN/config.yaml                        every resolved setting, the base model, the token strings
    RUN/metrics.jsonl                      one JSON object per optimizer step
    RUN/samples/                           validation grids during training (a row per sample prompt)
    RUN/checkpoints/step-000100/           resumable state (safetensors + json), last K kept
    RUN/pytorch_lora_weights.safetensors   diffusers LoRA (``pipe.load_lora_weights(RUN)``)
    RUN/embeddings/<token>.safetensors     one textual-inversion file per token
    RUN/a1111/                             kohya LoRA + A1111 embeddings
    RUN/logs/                              TensorBoard (scalars; sample grids with --sample-every)
    RUN/loss.png                           the loss terms per phase (written at the end)
    RUN/DONE                               written last: the run finished
    RUN/.magicstudio.lock                  flock held by the process training or generating (its pid inside)

Folders are made when first written to, so a start that is refused leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..io import acquire_lock, atomic_write, check_finite, clean_temp_files, release_lock
from .state import load_state, save_state

CKPT_PREFIX = "step-"
#: what a run folder may hold besides the user's own notes: anything else means --out is somebody's folder
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "checkpoints", "samples", "embeddings", "prepared", "logs", "DONE",
               "pytorch_lora_weights.safetensors", "a1111", "generated", "class_images", "state", "loss.png"}


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.inputs: dict[str, str] = {}  # the photo folders and their checksums (``open_run``), for config.yaml

    # -- layout
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def embeddings(self) -> Path:
        return self.path / "embeddings"

    @property
    def done_path(self) -> Path:
        return self.path / "DONE"

    def is_done(self) -> bool:
        return self.done_path.is_file()

    def foreign_entries(self) -> list[str]:
        """Names in the folder that no run writes (hidden files aside)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))

    def create(self) -> "RunDir":
        """The run folder itself; ``checkpoints/``, ``samples/``, ``embeddings/`` appear when first written."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- lock
    def lock(self) -> "RunDir":
        """Take the run folder's exclusive OS lock (creating the folder), or raise a UserError naming the pid that
        holds it; then remove temporary files a killed process left (only the lock holder may)."""
        acquire_lock(self.path, "run folder")
        for folder in (self.path, self.checkpoints, self.embeddings, self.path / "a1111", self.samples):
            clean_temp_files(folder)
        return self

    def unlock(self) -> None:
        release_lock(self.path)

    # -- config
    def write_config(self, config: Any) -> None:
        data = asdict(config) if is_dataclass(config) else dict(config)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        atomic_write(self.config_path, lambda p: p.write_text(text))

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not a magicstudio run (no config.yaml)")
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.config_path} is damaged ({type(exc).__name__}); it is not readable YAML") from None
        if not isinstance(data, dict) or "model" not in data:
            raise UserError(f"{self.config_path} is damaged: it does not hold a run's settings (no 'model' entry)")
        return data

    # -- metrics
    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
        return out

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records after ``last_step`` (they belong to work lost since the checkpoint)."""
        keep = [r for r in self.read_metrics() if int(r.get("step", 0)) <= last_step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.metrics_path, lambda p: p.write_text(text))

    # -- checkpoints
    def list_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "COMPLETE").is_file():
                try:
                    found.append((int(p.name[len(CKPT_PREFIX):]), p))
                except ValueError:
                    continue
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.list_checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, step: int, state: dict, keep: int = 2) -> Path:
        """Write ``checkpoints/step-N`` atomically (temp dir + rename) and keep the last ``keep``."""
        for key, value in _tensors(state):
            check_finite({key: value}, f"the checkpoint of step {step}")
        final = self.checkpoints / f"{CKPT_PREFIX}{step:06d}"
        tmp = self.checkpoints / f".tmp-{CKPT_PREFIX}{step:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_state(tmp / "state", state)
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in self.list_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> dict:
        return load_state(path / "state")


def _tensors(obj, prefix: str = ""):
    """(dotted key, tensor) of every tensor in a nested state."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of the photos a run trains on: for a prepared folder its images and masks, for a raw one its image
    files (name and bytes). The same photos give the same value wherever the folder is."""
    from ..data.images import list_images
    from ..data.prepare import MANIFEST

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        files = sorted(p for sub in ("images", "masks") for p in (folder / sub).rglob("*")
                       if p.is_file() and not p.name.startswith("."))
    else:
        files = [p for p in list_images(folder) if p.is_file()]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
