"""Gives the memory a training run freed back to the operating system.

PyTorch's CPU tensors come from the C library's malloc. glibc keeps what a run frees inside its
heap (it only unmaps blocks above its mmap threshold, which rises to 32 MB as blocks are freed),
so a ComfyUI server that trained a LoRA stays that much larger until it exits: measured on a
Flux-shaped model of 1300M parameters, 0.36 GB (bf16 base) and 0.50 GB (fp8 base) given back when
Train LoRA's run ended, with the model still loaded (docs/train_bench.md). ``malloc_trim`` returns every
free page of every arena at once; it frees nothing that is in use.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import platform


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (platform.libc_ver reads the interpreter's binary);
    None on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Collects unreachable objects, then asks glibc to return its free pages; True when it ran
    (glibc only: other C libraries give memory back on their own terms and are left alone)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    gc.collect()
    trim(0)
    return True
