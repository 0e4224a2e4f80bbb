"""Let repeated compiled calls on the CPU reuse their temporary buffers' pages.

XLA on CPU allocates every temporary buffer of a compiled call afresh and frees it at
the end (154 MB per energy + forces of a 108-atom Cu cell with our MACE). Under glibc's
defaults such a block is `mmap`ed and `munmap`ed on every call, so the kernel
zero-fills it again, one 4 KiB page fault at a time (37 600 faults, about a third of
that call's time on one core). Two changes keep it in the heap for the next call:

- JAX runs CPU computations on the calling thread instead of handing them to a worker
  thread (`jax_cpu_enable_async_dispatch` off). glibc gives each thread its own arena,
  and the heaps of arenas other than the main thread's are capped at 64 MiB: a larger
  block allocated there is always mmapped, whatever the settings below say. Running
  inline also saves the hand-over (a single-molecule prediction: ~5 % faster).
- glibc's malloc never mmaps (`M_MMAP_MAX` 0) and trims the heap's top only beyond
  2 GiB free (`M_TRIM_THRESHOLD`): freed blocks stay in the heap, warm.

The cost: the process keeps its peak heap as a pool for the next call, and Python no
longer runs ahead of CPU computations (the training loop prepares its batches on their
own thread, so it still overlaps). Both settings are process-wide and take effect only
before JAX's CPU backend starts (the first computation). Like precision, they are the
program's choice: the command-line tools (`python train.py`, `python -m mpnn.md`,
`python -m mpnn.evaluate`) call `keep_freed_memory()` first; a script or notebook calls
`mpnn.keep_freed_memory()` before it computes anything. `MPNN_KEEP_FREED_MEMORY=0` in the
environment makes it do nothing. Outside glibc (macOS, musl) only the JAX setting
applies.
"""

from __future__ import annotations

import ctypes
import logging
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
ENV_SWITCH = "MPNN_KEEP_FREED_MEMORY"

_applied = False


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def environment() -> dict[str, str]:
    """The same settings as environment variables, for a process started from here
    (glibc and JAX read them at start-up): what `benchmarks/speed.py --keep-freed-memory`
    gives every implementation."""
    return {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
        "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false",
    }


def keep_freed_memory() -> bool:
    """Apply the settings above (once per process). Returns whether glibc's malloc
    settings are in effect: False outside glibc, with MPNN_KEEP_FREED_MEMORY=0, or when
    called after JAX's first computation (then it warns and changes nothing)."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    import jax

    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a JAX without it: assume it is early enough
        backends_are_initialized = lambda: False  # noqa: E731
    if backends_are_initialized():
        # The malloc settings alone would only grow the heap (e.g. of a test worker that
        # calls an entry point's main() in-process).
        logging.getLogger(__name__).warning(
            "keep_freed_memory() after JAX's first computation changes nothing: CPU computations already "
            "run on a worker thread, whose large temporaries glibc cannot keep; call it before anything computes"
        )
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    _applied = all([libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings])
    return _applied
