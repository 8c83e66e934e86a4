"""Process-wide speed settings: what the CLI sets before a command, and a library call to `dpop.train` too."""

from __future__ import annotations


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel at once.

    A training step frees and reallocates the same large buffers (activations, logits chunks) every step; by
    default glibc trims them back to the kernel and the next step page-faults them in again, zero-filled. On
    the demo that was minutes of system time (3.3 of 21.4). MALLOC_* environment variables a user sets win;
    elsewhere than glibc this does nothing."""
    import ctypes
    import os

    if any(name.startswith("MALLOC_") for name in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 1 << 30)  # keep up to 1 GiB of freed heap
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum: blocks below 32 MiB come from the heap
