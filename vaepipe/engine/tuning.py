"""The engine's first-call set-up, paid ahead of time and remembered per machine (`vaepipe warmup`).

What the first decode call in a process pays beyond a steady one, and what of it can be kept:
- Triton compiles each kernel specialisation once per machine and keeps it in its own cache (~/.triton/cache, or
  TRITON_CACHE_DIR); `vaepipe warmup` pays that ahead (9.5 s at 480p, 14.2 s for Wan 2.2 on a fresh H100 machine
  before it). The engine's kernels have fixed configurations (kernels.CONV_TILES, kernels.reduction_plan): there is
  no Triton autotuning whose choice would need pinning.
- cuDNN's algorithm choice under cudnn.benchmark is timed in each process and cannot be stored through PyTorch (its
  plan cache lives in the process, one plan per conv shape: whichever call came first, tuned or not). What can be
  stored is whether tuning pays on this GPU, dtype, VAE and frame size: warmup times a short clip with tuning and
  with cuDNN's heuristic choice, each in a fresh process (in one process the first would fix the plans of both),
  and keeps the one that decodes a standard clip (81 frames) faster, first calls included. The trade: tuning
  spends seconds of trials in the first calls for faster steady calls; a one-shot decode has few steady calls.
  Without a record the engine tunes, as it always has (measured on its steady calls: docs/benchmarks.md); a
  warm-up call at another size would not help, since cuDNN's plans are per shape.
- The exact policy's self-check is not stored: with tuning on, the tuned algorithm may differ between processes,
  and the check is what guarantees diffusers' bits in each.

Records live in $VAEPIPE_CACHE_DIR, else $XDG_CACHE_HOME/vaepipe, else ~/.cache/vaepipe (engine-tuning.json), keyed
by GPU, versions (torch, CUDA, cuDNN, Triton, vaepipe), dtype, decoder shape, latent frame size, frames per call and
policy. VAEPIPE_CUDNN_TUNING=1 or 0 overrides them (for measuring both ways).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import __version__
from ..errors import VaepipeError

TUNE_BY_DEFAULT = True
"""cuDNN tuning for the steady calls where no record says otherwise (what the engine has always done)."""
STANDARD_LATENT_FRAMES = 21
"""The clip the choice is made for: 81 frames, what Wan pipelines make."""
_FILE = "engine-tuning.json"


def cache_dir() -> Path:
    if folder := os.environ.get("VAEPIPE_CACHE_DIR"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaepipe"


def record_key(engine, height: int, width: int, k: int) -> str:
    """What a record holds for: the machine's GPU and libraries, and the decode's shapes and policy."""
    device = engine.ctx.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    shapes = hashlib.sha1(str([tuple(p.shape) for p in engine.vae.decoder.parameters()]).encode()).hexdigest()[:12]
    parts = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version(), "triton": triton_version, "vaepipe": __version__,
             "dtype": str(engine.decoder.conv_out.weight.dtype).removeprefix("torch."), "decoder": shapes,
             "latent": f"{height}x{width}", "k": k, "policy": "exact" if engine.exact else "fast"}
    return json.dumps(parts, sort_keys=True)


def records() -> dict[str, dict]:
    try:
        found = json.loads((cache_dir() / _FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def remember(key: str, record: dict) -> None:
    """Add a record (written whole to a temporary file and renamed: a reader never sees half a file)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    found = records() | {key: record}
    fd, tmp = tempfile.mkstemp(prefix=".engine-tuning-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(found, f, indent=1)
        os.replace(tmp, folder / _FILE)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def cudnn_tuning(engine, height: int, width: int, k: int) -> bool:
    """Whether the engine's steady calls let cuDNN tune: the override, else this machine's record, else the
    default."""
    forced = os.environ.get("VAEPIPE_CUDNN_TUNING")
    if forced in ("0", "1"):
        return forced == "1"
    record = records().get(record_key(engine, height, width, k))
    return bool(record["cudnn_tuning"]) if record and "cudnn_tuning" in record else TUNE_BY_DEFAULT


def probe(vae_src: str, *, dtype: str, device: str, size: str, exact: bool, tune: bool) -> dict:
    """In this process: decode a short clip (the first call, then three steady calls) with the engine at `size`
    (HEIGHTxWIDTH of the video), cuDNN tuning on or off; return each call's seconds and the record's key."""
    from ..families import synthetic_latents
    from ..latents import parse_size
    from ..runner import DecodeOptions
    from ..vae import load_vae
    from . import Engine, schedule

    options = DecodeOptions(vae=vae_src, dtype=dtype, device=device)
    where = options.torch_device()
    vae = load_vae(vae_src, dtype=options.torch_dtype(where), device=where)
    engine = Engine(vae.model, exact=exact)
    height, width = parse_size(size if size.count("x") == 2 else f"{size}x1")[:2]  # (frames: the probe's own)
    scale = vae.family.spatial_factor(vae.model)
    k = engine.chunk_for(height // scale, width // scale)
    frames = vae.family.num_frames(vae.model, 1 + 3 * k)
    z = synthetic_latents(vae.model, f"{height}x{width}x{frames}")
    os.environ["VAEPIPE_CUDNN_TUNING"] = "1" if tune else "0"
    calls = []
    with torch.inference_mode():
        z, _ = vae.family.prepare(vae.model, z, denormalize=True, settings=_settings())
        sizes = schedule(z.shape[2], k)
        out = None
        pieces = engine.stream(z)
        for n in sizes:
            t = time.perf_counter()
            piece = next(pieces)
            f, h, w = piece.shape[2:]
            if out is None:
                out = torch.empty((k * 4 + 4, h, w, 3), dtype=torch.uint8, device=where)
            piece.write_uint8(out)
            if where.type == "cuda":
                torch.cuda.synchronize(where)
            calls.append((n, time.perf_counter() - t))
    return {"key": record_key(engine, z.shape[3], z.shape[4], k), "k": k, "calls": calls}


def _settings():
    from ..families import DecodeSettings

    return DecodeSettings()


def standard_clip_s(calls: list[tuple[int, float]], k: int) -> float:
    """A probe's calls extrapolated to the standard clip: its first two calls as measured (the first call and the
    first steady one carry the set-up), every later call at the steady rate."""
    from . import schedule

    steady = min(s for n, s in calls[2:]) / k if len(calls) > 2 else calls[-1][1] / k
    rest = sum(schedule(STANDARD_LATENT_FRAMES, k)) - calls[0][0] - calls[1][0]
    return calls[0][1] + calls[1][1] + rest * steady


def warm_up(vae_src: str, size: str, *, dtype: str | None, device: str | None, exact: bool = False) -> dict:
    """Decode a short clip at `size` with `vae_src` in two fresh processes, cuDNN tuning on and off (compiling the
    Triton kernels into Triton's cache on the way), and remember which decodes the standard clip faster."""
    args = [vae_src, dtype or "", device or "", size, "1" if exact else "0"]
    runs = {tune: _probe_in_child([*args, "1" if tune else "0"]) for tune in (True, False)}
    if runs[True]["key"] != runs[False]["key"]:
        raise VaepipeError("warm-up: the two probes decoded different shapes (free memory changed between them?)")
    k = runs[True]["k"]
    clip = {tune: standard_clip_s(run["calls"], k) for tune, run in runs.items()}
    record = {"cudnn_tuning": clip[True] <= clip[False], "standard_clip_s": {"tuned": round(clip[True], 4),
              "heuristic": round(clip[False], 4)}, "calls_s": {"tuned": runs[True]["calls"],
              "heuristic": runs[False]["calls"]}, "vae": vae_src, "size": size,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    remember(runs[True]["key"], record)
    return record


def _probe_in_child(args: list[str]) -> dict:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("VAEPIPE_CUDNN_TUNING", None)
    proc = subprocess.run([sys.executable, "-m", "vaepipe.engine.tuning", *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise VaepipeError(f"warm-up probe failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the probe's fresh process: VAE DTYPE DEVICE SIZE EXACT TUNE
    vae_arg, dtype_arg, device_arg, size_arg, exact_arg, tune_arg = sys.argv[1:7]
    result = probe(vae_arg, dtype=dtype_arg or None, device=device_arg or None, size=size_arg,
                   exact=exact_arg == "1", tune=tune_arg == "1")
    print(json.dumps(result))
