"""The glibc allocator settings that make CPU training and sampling of full-size models faster.

PyTorch on CPU frees and re-allocates the same large activation buffers every step; glibc's defaults return them
to the kernel (``mmap``/``munmap`` and heap trimming), so each step pays for page faults on fresh zeroed pages.
Keeping large blocks on the heap (mmap threshold 32 MiB, trim threshold 2 GiB, top pad 1 GiB) made full-size
steps ~1.4x faster on the development machine (../shared/ENVIRONMENT.md). ``tune()`` applies them in-process with
``mallopt``, once, unless the matching ``MALLOC_*_`` variable is already set or ``MAGICSTUDIO_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h) and their values; the environment variable that would set each one
SETTINGS = ((-3, "MALLOC_MMAP_THRESHOLD_", 32 * 2**20), (-1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),
            (-2, "MALLOC_TOP_PAD_", 2**30))
_applied: bool | None = None


def tune() -> bool:
    """Apply the settings (glibc only); True when they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MAGICSTUDIO_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    _applied = all(env in os.environ or mallopt(param, value) == 1 for param, env, value in SETTINGS)
    return _applied
