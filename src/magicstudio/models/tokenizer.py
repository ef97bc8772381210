"""A genuine CLIP BPE tokenizer that works offline.

The 49,408-token CLIP vocabulary (OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, MIT licence, as shipped by
open_clip) is bundled in ``magicstudio/assets``. It is converted once into the ``vocab.json`` + ``merges.txt``
pair that ``transformers.CLIPTokenizer`` reads, so the tiny model tokenises prompts exactly like SD 1.5.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..io import atomic_write

N_MERGES = 49152 - 256 - 2


def cache_dir() -> Path:
    """Where magicstudio keeps derived files (``MAGICSTUDIO_CACHE`` or ``~/.cache/magicstudio``)."""
    root = os.environ.get("MAGICSTUDIO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "magicstudio")
    return Path(root)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE vocabulary into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = resources.files("magicstudio") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(src.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    atomic_write(out / "vocab.json", lambda p: p.write_text(json.dumps(encoder, ensure_ascii=False)))
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    atomic_write(out / "merges.txt", lambda p: p.write_text(merges_text, encoding="utf-8"))
    return out


@lru_cache(maxsize=1)
def clip_tokenizer_dir() -> Path:
    """A folder with the CLIP tokenizer files, created in the cache on first use."""
    out = cache_dir() / "clip-tokenizer"
    if not ((out / "vocab.json").is_file() and (out / "merges.txt").is_file()):
        write_clip_tokenizer_files(out)
    return out


def load_clip_tokenizer():
    """A fresh ``CLIPTokenizer`` over the bundled vocabulary (each call returns a new, unmodified one)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=77)
