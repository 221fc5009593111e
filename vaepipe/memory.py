"""What fits: the memory a new allocation can use, on the host and on a GPU, and a decode's needs checked against it
before anything of that size is allocated, so that sizes from a file's header end as one sentence (exit 2), never
as a MemoryError or an allocator's RuntimeError."""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path

import torch

from .errors import BadInput

# The decoder's working memory per output pixel and frame is at least this many feature maps at its full-resolution
# width (the conv's input and output, the causal cache, the residual). A floor, not an estimate: Wan 2.1 at
# 480x832 bf16 streams at 5.0 GiB where the floor says 1.2 GiB, so a decode that passes may still run out (exit 1).
_FEATURE_MAPS = 4


def gib(n: float) -> str:
    """Bytes for people: 1.5 GiB, 56.8 PiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def host_available() -> int:
    """Bytes of host memory a new allocation can use: the kernel's MemAvailable, capped by a container's memory limit
    (cgroup) and by what is left under an address-space limit (`ulimit -v`), whichever is smallest."""
    found = [_meminfo_available()]
    found.append(_cgroup_available())
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(soft - _status_kib("VmSize") * 1024)
    return max(0, min(v for v in found if v is not None))


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """Limit minus usage of the cgroup this process sees at the root of its hierarchy (a container's own); the page
    cache it could drop counts as free. v2 (memory.max) or v1 (memory/memory.limit_in_bytes)."""
    for folder, limit, usage, cache in ((Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
                                        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes",
                                         "memory.usage_in_bytes", "total_inactive_file")):
        try:
            cap = (folder / limit).read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:  # no limit (v1 writes a huge number)
                return None
            used = int((folder / usage).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            return int(cap) - used + int(stat.get(cache, 0))
        except (OSError, ValueError):
            continue
    return None


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def device_available(device: torch.device) -> int:
    """Bytes a new allocation on `device` can use: on a GPU the driver's free memory plus what PyTorch's caching
    allocator holds unused, within the process's memory fraction; on the CPU, `host_available()`."""
    if device.type != "cuda":
        return host_available()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    # A cap set with torch.cuda.set_per_process_memory_fraction (a shared GPU, a test) binds before the card does.
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
    return max(0, min(available, int(fraction * total) - allocated))


def decode_need(*, frame_shape: tuple[int, int, int], frames_per_chunk: int, frames_per_call: int, k: int,
                dtype: torch.dtype, width: float, latent_numel: int = 0) -> tuple[int, int]:
    """Bytes a decode needs at least: (one set of lane buffers, the decoder's working memory).

    `frame_shape` is the padded [H, W, 3]; `k` slots of `frames_per_chunk` uint8 frames, one set on the device and
    one on the host; the decoder makes `frames_per_call` frames per call at `width` channels per output pixel (its
    full-resolution width), from one sample of `latent_numel` latents (copied to the device, denormalised and
    through the post-quant conv: three copies)."""
    h, w, _ = frame_shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = k * frames_per_chunk * math.prod(frame_shape)
    working = _FEATURE_MAPS * width * frames_per_call * h * w * itemsize + 3 * latent_numel * itemsize
    return buffer, int(working)


def check_decode_fits(*, frame_shape: tuple[int, int, int], frames_per_chunk: int, frames_per_call: int, k: int,
                      device: torch.device, dtype: torch.dtype, width: float, latent_numel: int = 0,
                      held: tuple[int, int] = (0, 0)) -> None:
    """Refuse (BadInput) a decode whose `decode_need` cannot fit where it goes. `held`: bytes of (device, host)
    buffers this session holds, which a new setup frees first."""
    buffer, working = decode_need(frame_shape=frame_shape, frames_per_chunk=frames_per_chunk,
                                  frames_per_call=frames_per_call, k=k, dtype=dtype, width=width,
                                  latent_numel=latent_numel)
    h, w, _ = frame_shape
    where = "GPU memory on " + str(device) if device.type == "cuda" else "memory (RAM)"
    need = buffer + working + (0 if device.type == "cuda" else buffer)
    have = device_available(device) + held[0] + (0 if device.type == "cuda" else held[1])
    fix = "decode smaller latents, or free memory"
    if k > 2 or frames_per_chunk > frames_per_call:
        fix = "use --buffers 2 and --chunk 1, " + fix
    if need > have:
        raise BadInput(f"frames of {w}x{h} need at least {gib(need)} of {where} here ({k} buffer slots of"
                       f" {frames_per_chunk} frames, {gib(buffer)} each on the device and the host, and the decoder's"
                       f" working memory, at least {gib(working)}), but {gib(have)} is available: {fix}")
    if device.type == "cuda" and buffer > host_available() + held[1]:
        raise BadInput(f"frames of {w}x{h} need {gib(buffer)} of pinned host memory for {k} buffer slots of"
                       f" {frames_per_chunk} frames, but {gib(host_available() + held[1])} is available: {fix}")
