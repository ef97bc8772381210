"""Small file helpers shared by every layer: atomic writes and safe weight loading.

Everything magicstudio writes that holds tensors is safetensors; pickle files made by others (for example an
ArcFace ``backbone.pth``) are read with ``torch.load(weights_only=True)`` only, so loading never runs code.
"""

from __future__ import annotations

import errno
import json
import os
import pickletools
import re
import secrets
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


#: temporary files of ``atomic_write``: short (a 255-byte file name stays possible), hidden, easy to clean up
TEMP_PREFIX, TEMP_SUFFIX = ".ms-", ".tmp"


def _new_temp(folder: Path) -> Path:
    """A new empty file ``folder/.ms-<8 hex>.tmp``, created exclusively with mode 0666 & ~umask (the mode any
    ordinary file gets, so exports are readable by other programs exactly as the user's umask allows)."""
    for _ in range(100):
        path = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free temporary file name", str(folder))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    The temporary name is short whatever ``path`` is called, and the file's mode honours the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp(path.parent)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def write_new(folder: str | os.PathLike, names: Iterable[str], write: Callable[[Path], None]) -> Path:
    """Write once to a temporary file, then give it the first of ``names`` that no file in ``folder`` has.

    The name is claimed with a hard link, which fails if the name exists, so two processes writing into one
    folder at once never replace each other's file (a check-then-write would). Returns the path written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp(folder)
    try:
        write(tmp_path)
        for name in names:
            target = folder / name
            try:
                os.link(tmp_path, target)
                return target
            except FileExistsError:
                continue
            except OSError as exc:  # a file system without hard links: claim the name exclusively, then rename
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                try:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    continue
                os.replace(tmp_path, target)
                return target
        raise OSError(errno.EEXIST, "every candidate name is taken", str(folder))
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def clean_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted ``atomic_write`` left in ``folder`` (kill -9, power loss).
    Call it only while holding the folder's lock (``folder_lock``): another writer's temp file is not stale."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


LOCK_FILE = ".magicstudio.lock"
_HELD: dict[str, list] = {}  # this process's locks: real path -> [fd, depth]


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The pid written in ``folder``'s lock file (the process that holds it, or held it last), if any."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError):
        return None


def acquire_lock(folder: str | os.PathLike, what: str = "folder") -> None:
    """Take ``folder``'s exclusive lock (``flock`` on ``folder/.magicstudio.lock``, created with the folder if
    needed) or raise a one-line UserError naming the process that holds it. The kernel releases the lock when
    the process ends, however it ends (kill -9 included), so a folder is never left locked. Re-entrant within
    one process; every ``acquire_lock`` needs one ``release_lock``."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = lock_holder(folder)
        who = f"pid {pid}" if pid else "another process"
        raise UserError(f"{what} {folder} is in use by another magicstudio process ({who}); wait until it "
                        "finishes or use another folder (nothing was changed)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]


def release_lock(folder: str | os.PathLike) -> None:
    """Undo one ``acquire_lock`` (the lock itself goes with the last one)."""
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor releases the flock


def holds_lock(folder: str | os.PathLike) -> bool:
    return os.path.realpath(folder) in _HELD


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """``acquire_lock`` for the block."""
    acquire_lock(folder, what)
    try:
        yield Path(folder)
    finally:
        release_lock(folder)


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


UNSAFE_PICKLE = "it holds objects other than tensors and unpickling it could run code"


def read_pickle(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``); ``mmap`` maps a zip checkpoint
    instead of reading it. UserError that tells a damaged file apart from one that needs code to unpickle (and a
    plain Python pickle, which is no PyTorch checkpoint)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4" on files that then fail anyway
            return torch.load(str(path), map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:
        raise pickle_error(path, exc) from None


def pickle_error(path: Path, exc: BaseException) -> UserError:
    """The one-line reason ``torch.load(weights_only=True)`` refused ``path`` (never torch's advice to pass
    ``weights_only=False``): unsafe (it needs code to unpickle), a plain pickle, or damaged."""
    kind = "damaged"
    if re.search(r"GLOBAL|allowlist|unrecognized function", str(exc)):  # torch's weights-only unpickler refused
        kind = "unsafe"
    elif not zipfile.is_zipfile(path):  # a raw pickle torch cannot parse (e.g. protocol 4/5 frames): look inside
        kind = _raw_pickle_kind(path)
    if kind == "unsafe":
        return UserError(f"refusing to load {path}: {UNSAFE_PICKLE}; it is refused as unsafe (convert it to "
                         ".safetensors with the tool that made it)")
    if kind == "plain":
        return UserError(f"{path} is a plain Python pickle, not a PyTorch checkpoint of tensors")
    return UserError(f"{path} is not a readable PyTorch checkpoint: it is damaged, truncated or not a checkpoint at all")


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2",
                 "EXT4"}


def _raw_pickle_kind(path: Path, limit: int = 64 << 20) -> str:
    """"unsafe" when the pickle stream names callables or classes, "plain" when it parses without any, "damaged"
    when it does not parse. Only the opcodes are read (``pickletools``): nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
        ops = {op.name for op, _, _ in pickletools.genops(data)}
    except Exception:
        return "damaged"
    return "unsafe" if ops & _CODE_OPCODES else "plain"


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


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """UserError naming ``path`` and the first tensor when any floating-point value is NaN or infinite: such
    weights generate black or noise images without another word."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{path} holds non-finite values (NaN or inf: {bad} in {key!r}); the weights are unusable, "
                            "refusing to load them")
    return tensors


def load_tensors(path: str | os.PathLike, finite: bool = True) -> dict[str, torch.Tensor]:
    """Load a weights file: safetensors, or a pickle restricted to tensors (``weights_only``).

    A pickle that needs arbitrary classes to unpickle is refused with a reason: loading weights must never
    execute code from the file. With ``finite`` (the default) NaN or infinite weights are refused too.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a weights file (.safetensors, .pt, .pth or .bin)")
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # corrupt header, truncated file, not safetensors at all
            raise UserError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}: {exc})") from None
        return check_finite(tensors, path) if finite else tensors
    if path.suffix in PICKLE_SUFFIXES:
        obj = read_pickle(path)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{path} does not hold a flat dictionary of tensors")
        return check_finite(obj, path) if finite else obj
    raise UserError(f"unsupported weights format {path.suffix!r} for {path} (use .safetensors, .pt, .pth or .bin)")
