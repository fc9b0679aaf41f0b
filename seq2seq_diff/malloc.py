"""glibc malloc settings for CPU training and translation (``cli.py`` applies them at start).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block of
``M_MMAP_THRESHOLD`` bytes or more (128 KiB at first, raised as such blocks are freed, up to
32 MiB) with a fresh ``mmap``, and gives the top of its heap back to the OS whenever more than
``M_TRIM_THRESHOLD`` is free there. A training step allocates and frees hundreds of activation
and gradient tensors of 0.1-10 MB, and decoding allocates new cache tensors every step, so
glibc keeps returning that memory and the next allocation page-faults it in again, page by page.
For one 960 × 256 ``rms_norm`` that is 0.75 ms instead of 0.07 ms (BENCHMARKS.md).

``tune_malloc`` raises both thresholds, so freed blocks stay in the process and are reused:
glibc then behaves like the caching allocators that CUDA and CTranslate2 use. The settings are
process-wide, which is why the command line applies them (it owns its process) and the library
does not; a program embedding ``Translator`` may call ``tune_malloc()`` itself. Freed memory is
kept, up to ``trim_threshold`` at the heap top, so the peak RSS can grow a little (measured in
BENCHMARKS.md).

Set ``SEQ2SEQ_DIFF_MALLOC=system`` to keep glibc's defaults. Settings the user gave glibc
(``GLIBC_TUNABLES`` naming malloc, or one of ``GLIBC_MALLOC_ENV``) are never overridden.
Other C libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # blocks this large or larger still get their own mmap
TRIM_THRESHOLD = 512 << 20  # free memory kept at the heap top before it goes back to the OS

ENV = "SEQ2SEQ_DIFF_MALLOC"
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only: musl has no such function
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def user_settings() -> str | None:
    """The malloc settings the environment already gives glibc (or asks us to keep), if any."""
    if os.environ.get(ENV, "").lower() == "system":
        return f"{ENV}=system"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return f"GLIBC_TUNABLES={tunables}"
    for name in GLIBC_MALLOC_ENV:
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    return None


def without_malloc_settings(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` less every malloc setting (``user_settings``): a child process started with
    it runs on glibc's defaults, or, if it is ``cli.py``, on ``tune_malloc``'s."""
    drop = {"GLIBC_TUNABLES", ENV, *GLIBC_MALLOC_ENV}
    return {name: value for name, value in environ.items() if name not in drop}


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD,
                trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether they were set.

    False, with nothing changed, on a C library other than glibc or when the environment
    already sets malloc (``user_settings``).
    """
    libc = _glibc()
    if libc is None:
        return False
    given = user_settings()
    if given is not None:
        logger.debug("malloc: keeping %s", given)
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    ok = bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)) and ok
    return ok
