"""Start-up: what a command costs around its decode, in parts, and the line that says vaepipe is loading.

The parts (`--json`'s "startup", the summary's start-up line; README "What one decode costs"):
- imports_s: from the process's start to torch, vaepipe and diffusers' model code imported (the interpreter's own
  start included);
- vae_load_s: loading the VAE onto its device (diffusers' import is counted as an import);
- first_call_extra_s: the decode lane's time beyond what the same frames take at its steady rate: the first calls'
  set-up (CUDA and cuDNN libraries, cuDNN's tuning, Triton kernels loaded or compiled, the first allocations);
- total_s: from the process's start to the summary.

Light on purpose: the command line imports it before torch."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

_IMPORTED = time.perf_counter()
_spent = {"diffusers_import_s": 0.0}


def process_s() -> float:
    """Seconds since this process started (Linux: from /proc, 10 ms steps; elsewhere since vaepipe was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def loading(quiet: bool) -> None:
    """Say at once, on stderr, that vaepipe is loading (importing torch and diffusers takes seconds: on a 2-core
    machine the first line came ~20 s after the command started). Not with --quiet; --json keeps stdout clean."""
    if not quiet:
        sys.stderr.write("loading PyTorch and diffusers…\n")
        sys.stderr.flush()


def import_diffusers() -> None:
    """Import diffusers' model code (the seconds every VAE class pays: diffusers.utils, its quantizers), timed as a
    start-up import rather than as the VAE's load. Each VAE class's own module comes with the class."""
    if "diffusers.models.modeling_utils" in sys.modules:
        return
    t = time.perf_counter()
    import diffusers.models.modeling_utils  # noqa: F401

    _spent["diffusers_import_s"] += time.perf_counter() - t


def init_device_early(device) -> None:
    """Start CUDA on a thread while the main thread imports diffusers and reads the latents: the driver's context,
    and cuDNN's and cuBLAS's libraries loaded by a tiny conv and matmul (a first conv otherwise pays them inside the
    first decode call). The main thread's first CUDA call waits for the context where it is not ready yet."""
    import torch

    if device.type != "cuda":
        return

    def run() -> None:
        try:
            with torch.cuda.device(device):
                x = torch.zeros((1, 8, 3, 8, 8), dtype=torch.bfloat16, device=device)
                torch.nn.functional.conv3d(x.to(memory_format=torch.channels_last_3d), torch.zeros((8, 8, 3, 3, 3),
                                           dtype=torch.bfloat16, device=device))
                x.view(8, -1)[:, :8] @ x.view(8, -1)[:, :8]
                torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a head start only: the main thread meets any error itself, and says it
            pass

    threading.Thread(target=run, name="vaepipe-cuda-init", daemon=True).start()


def first_call_extra_s(spans: list[tuple[str, int, float, float]], chunk_frames: list[int]) -> float | None:
    """The decode lane's busy time beyond its steady rate over the same frames: the steady rate is the median seconds
    per frame of the full-size chunks after the first of them (which may carry its shape's set-up). None where the
    clip has fewer than two full-size chunks."""
    busy = {i: end - start for lane, i, start, end in spans if lane == "decode"}
    if not chunk_frames or len(busy) != len(chunk_frames):
        return None
    full = max(chunk_frames)
    steady = [busy[i] / f for i, f in enumerate(chunk_frames) if f == full][1:]
    if not steady:
        return None
    return max(sum(busy.values()) - statistics.median(steady) * sum(chunk_frames), 0.0)


def parts(*, imports_done_s: float, vae_load_s: float, first_call_extra: float | None) -> dict:
    """The "startup" object of a summary (keys documented above)."""
    imports = imports_done_s + _spent["diffusers_import_s"]
    return {"imports_s": round(imports, 3), "vae_load_s": round(vae_load_s, 3),
            "first_call_extra_s": None if first_call_extra is None else round(first_call_extra, 3),
            "total_s": round(process_s(), 3)}
