"""Memory guard: estimate what a dense forward pass needs before running one."""

from __future__ import annotations

import os
from collections.abc import Sequence

from econv_convert.core.records import DenseInfo
from econv_convert.errors import InvalidInputError

# a forward pass holds the largest map, its padded copy and the next layer's output at once
LIVE_FACTOR = 3


class ResourceError(InvalidInputError):
    """A run would need more memory than is available."""


def available_bytes() -> int | None:
    """Memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes(meta: DenseInfo, shape: Sequence[int], element_size: int = 4) -> int:
    """Activation memory of one dense forward pass at input ``shape`` (an estimate: the largest
    dense map at the example input, scaled by the input's area and batch)."""
    example, shape = meta.canonical(meta.example_shape), meta.canonical(shape)
    scale = shape[0] / max(example[0], 1)
    for new, old in zip(shape[2:], example[2:]):
        scale *= new / max(old, 1)
    return int(meta.peak_elements * scale * element_size * LIVE_FACTOR)


def check_memory(meta: DenseInfo, shape: Sequence[int], *, force: bool = False,
                 why: str = "") -> int:
    """Refuse (ResourceError) a run at ``shape`` that would not fit; returns the estimate.
    ``why`` says where that input size comes from, for the message."""
    need = estimate_bytes(meta, shape)
    have = available_bytes()
    if not force and have is not None and need > have:
        reason = f" ({why})" if why else ""
        raise ResourceError(
            f"a dense forward pass at input {'x'.join(map(str, shape))}{reason} needs about "
            f"{_gib(need)} (largest map: {meta.peak_node}), but only {_gib(have)} is available; "
            "use a smaller input_shape=..., or force=True to try anyway")
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_NEVER = -1  # M_TRIM_THRESHOLD: never trim the heap (mallopt(3))


def keep_freed_memory() -> bool:
    """Let this process reuse the memory of the maps it frees instead of handing it back to
    the system. glibc serves allocations over 32 MiB (every full-size map of a block) with
    fresh ``mmap`` pages that are faulted in, zeroed and unmapped on every pass: on a
    1440-pixel block that doubled the time of a dense pass (``benchmarks/scene.py
    --profile``). Maps up to 2 GiB (the most ``mallopt`` takes) come from the heap here, and
    the heap is never trimmed: at glibc's trim threshold (2 GiB at most) a ResNet-18's
    4096-pixel blocks, which free more than that at once, gave their memory back after every
    block and faulted it in again in the next (on this VM a fault costs up to 12 us: 16
    blocks of a 16384² image spent 36 s in the kernel, 16 s without trimming). The peak
    memory is the same; it stays held while the process runs. For processes that run blocks
    (``predict``'s own and its workers'), not for a library user's. Returns whether the
    setting took (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, (1 << 31) - 1)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER))
    except (OSError, AttributeError):
        return False
