"""The host-memory modes, and handing freed memory back to the OS at once (glibc) for ``lean``.

glibc serves large blocks with their own mmap, but it raises that threshold every time such a block
is freed (up to 32 MB), after which tensors of that size come from the heap, whose holes are kept
resident. Pinning the threshold with ``mallopt`` stops that: every block of ``MMAP_THRESHOLD`` bytes
or more is unmapped when freed, so the resident set follows the live tensors. The price is a page
fault per page of every such block on its first touch (docs/performance.md). The setting is
process-wide and cannot be undone for blocks already placed.
"""
from __future__ import annotations

import ctypes
import ctypes.util

#: ``fast``: ONNX Runtime's arena and buffer reuse; ``lean``: neither, and freed blocks go back to the
#: OS at once, so the resident set follows the live tensors, at the cost of a page fault per page of
#: every new tensor (sizes and speeds in docs/performance.md)
MEMORY_MODES = ("fast", "lean")
M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 2**10  # glibc's own initial threshold, pinned so that it no longer grows


def check_memory_mode(memory: str) -> None:
    if memory not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory!r}; choose one of {', '.join(MEMORY_MODES)}")


def pin_mmap_threshold() -> bool:
    """True when glibc took the setting; False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD))
