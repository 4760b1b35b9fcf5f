"""Process-wide CPU runtime settings: the allocator's treatment of large freed blocks.

PyTorch allocates CPU tensors with ``malloc``. glibc serves a block above its mmap threshold (dynamic, 128 KiB to
32 MiB) with a fresh ``mmap`` and unmaps it on free, and it returns free memory at the top of the heap to the
system beyond its trim threshold (dynamic: twice the mmap threshold). A ViL block's temporaries at 448 px exceed
that, so the heap grows and shrinks within every block and each growth page-faults the activations in again; the
forward then costs markedly more than with the memory kept (docs/BENCHMARKS.md, ``python
benchmarks/encoder_speed.py --scaling``).

:func:`retain_freed_memory` sets the mmap threshold to its maximum (32 MiB) and the trim threshold to 2 GiB, so
freed blocks are reused from the heap. The price is that the resident memory stays at its peak, as on GPUs with
PyTorch's caching allocator: memory freed by the process is reused by it but not returned to the system. Building
any encoder (:class:`~mal.models.vil.ViLEncoder`, :class:`~mal.models.vit.ViTEncoder`, so every model of
``mal.create_model`` and friends) applies it, and so do the ``mal`` command and the benchmarks. ``import mal``
alone does not. ``MAL_RETAIN_FREED_MEMORY=0`` in the environment (before the first model is built) turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters of glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Keeps freed large blocks in the heap (glibc on Linux only). Returns whether the settings are in effect.

    Idempotent; a no-op returning False on other systems and C libraries, or when the environment variable
    ``MAL_RETAIN_FREED_MEMORY`` is ``0``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("MAL_RETAIN_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # glibc only: musl has a mallopt that does nothing, and no gnu_get_libc_version
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
