"""The decode lane alone, decoder against decoder, on the same latents and weights in one process:

    diffusers      vae.decode(z).sample: what the naive path runs
    stream         vaepipe's stream of diffusers' own decoder calls into uint8 frames: what the decode lane runs
                   where the engine does not (the CPU, --no-engine, families other than Wan); shown only there
    engine         vaepipe's engine, fast policy: what GPUs run by default (CUDA only)
    engine-exact   vaepipe's engine, exact policy (--exact): its self-check runs in its first call
    fastvae        fastvae's FastVAEDecoder (pip install fastvae), its defaults
    fastvae-tuned  fastvae in its fastest setting: cuDNN autotuning on, 4 latent frames per call

Each row: the first call of this process (compilation, tuning, self-check), the median and range of the timed calls,
the peak memory above the model, and whether its video is identical to diffusers' (torch.equal on the decoded
tensors). With --fidelity, also PSNR and max abs difference against an fp32 decode with fp32 weights (the truth).
The engine's calls write uint8 frames as the decode lane does; the others return their float video.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import statistics
from collections.abc import Callable, Iterator

import torch

from .. import engine as engines
from ..decode import decode_stream, to_uint8_frames
from ..families import DecodeSettings
from ..progress import Reporter
from ..vae import LoadedVae, load_vae
from .measure import seconds

DECODERS = ("diffusers", "stream", "engine", "engine-exact", "fastvae", "fastvae-tuned")


def decoder_table(vae: LoadedVae, latents: torch.Tensor, src: str, runs: int, *, fidelity: bool,
                  reporter: Reporter) -> dict:
    """Time every decoder that applies to `vae` on the normalised `latents` [1, C, T, h, w]."""
    with torch.inference_mode():
        z, kwargs = vae.family.prepare(vae.model, latents, denormalize=True, settings=DecodeSettings())
        engines_used: dict[str, engines.Engine] = {}
        calls = _decoders(vae, z, kwargs, engines_used)
        skipped = {name: why for name, why in calls.items() if isinstance(why, str)}
        calls = {name: call for name, call in calls.items() if not isinstance(call, str)}
        for name, why in skipped.items():
            reporter.log(f"decoders: {name} skipped ({why})")
        want = vae.family.decode(vae.model, z, **kwargs)
        truth = fp32_truth(src, latents, vae) if fidelity else None
        rows = {}
        for name, (run, video) in calls.items():
            rows[name] = row = _time(run, runs, vae.device)
            got = video()
            row["identical_to_diffusers"] = bool(got.shape == want.shape and torch.equal(got, want))
            if truth is not None:
                row["psnr_vs_fp32_db"], row["max_abs_vs_fp32"] = _fidelity(got, truth)
            del got
            if name in engines_used:
                row["self_check_s"] = round(engines_used[name].check_s, 4) if name == "engine-exact" else None
                row["fallbacks"] = engines_used[name].fallbacks
            reporter.log(f"decoders: {name} {row['median_s']:.3f} s (first call {row['first_call_s']:.2f} s)"
                         + ("" if row["identical_to_diffusers"] else ", not bit-identical to diffusers"))
        base = rows.get("diffusers", {}).get("median_s")
        for row in rows.values():
            row["speedup_vs_diffusers"] = round(base / row["median_s"], 3) if base else None
    return {"rows": rows, "skipped": skipped, "runs": runs}


def _decoders(vae: LoadedVae, z: torch.Tensor, kwargs: dict,
              engines_used: dict[str, engines.Engine]) -> dict[str, tuple[Callable, Callable] | str]:
    """Per decoder: (a timed call, the decoded video [1, 3, F, H, W] for the comparisons), or why it is left out."""
    out: dict[str, tuple[Callable, Callable] | str] = {
        "diffusers": (lambda: vae.family.decode(vae.model, z, **kwargs),
                      lambda: vae.family.decode(vae.model, z, **kwargs))}
    # The table shows what the decode lane runs here: the engine on CUDA for Wan, vaepipe's stream elsewhere.
    if vae.device.type != "cuda" or not engines.supports(vae.model):
        out["stream"] = (lambda: _stream_lane(vae, z, kwargs), lambda: _stream_video(vae, z, kwargs))
    if vae.device.type != "cuda":
        out["engine"] = out["engine-exact"] = ("the engine runs on CUDA GPUs only; the CPU decodes with diffusers'"
                                               " decoder, streamed (the stream row)")
    elif not engines.supports(vae.model):
        out["engine"] = out["engine-exact"] = f"the engine decodes Wan VAEs, not {type(vae.model).__name__}"
    else:
        for name, exact in (("engine", False), ("engine-exact", True)):
            engines_used[name] = engine = engines.Engine(vae.model, exact=exact)
            out[name] = (lambda e=engine: _engine_lane(e, z), lambda e=engine: _engine_video(e, z))
    if vae.device.type != "cuda":
        out["fastvae"] = out["fastvae-tuned"] = "fastvae runs on CUDA GPUs only"
    elif importlib.util.find_spec("fastvae") is None:
        out["fastvae"] = out["fastvae-tuned"] = "not installed: pip install fastvae (or 'vaepipe[peers]')"
    elif not engines.supports(vae.model):
        out["fastvae"] = out["fastvae-tuned"] = "fastvae decodes Wan VAEs only"
    else:
        from fastvae import FastVAEDecoder

        fast = FastVAEDecoder.from_vae(vae.model).to(vae.device)
        out["fastvae"] = (lambda: fast.decode(z), lambda: fast.decode(z))

        def tuned() -> torch.Tensor:
            with _cudnn_benchmark():
                return fast.decode(z, chunk_frames=4)

        out["fastvae-tuned"] = (tuned, tuned)
    return out


def _stream_lane(vae: LoadedVae, z: torch.Tensor, kwargs: dict) -> None:
    """What the decode lane does without the engine: the family's pieces into a uint8 frame buffer."""
    frames = None
    for piece in decode_stream(vae.model, z, **kwargs):
        f, h, w = piece.shape[2:]
        if frames is None:
            frames = torch.empty((vae.temporal_factor, h, w, 3), dtype=torch.uint8, device=z.device)
        to_uint8_frames(piece, frames[:f])


def _stream_video(vae: LoadedVae, z: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return torch.cat(list(decode_stream(vae.model, z, **kwargs)), dim=2)


def _engine_lane(engine: engines.Engine, z: torch.Tensor) -> None:
    """What the decode lane does with the engine: every piece into a uint8 frame buffer."""
    frames = None
    for piece in engine.stream(z):
        f, h, w = piece.shape[2:]
        if frames is None:
            frames = torch.empty((engine.max_frames(*z.shape[3:]), h, w, 3), dtype=torch.uint8, device=z.device)
        piece.write_uint8(frames)


def _engine_video(engine: engines.Engine, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([piece.video() for piece in engine.stream(z)], dim=2)


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _time(call: Callable, runs: int, device: torch.device) -> dict:
    def once() -> float:
        return seconds(call, device)

    first = once()
    times = [once() for _ in range(runs)]
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        once()
        peak = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
    return {"first_call_s": round(first, 4), "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4), "max_s": round(max(times), 4), "peak_gib": peak}


def fp32_truth(src: str, latents: torch.Tensor, vae: LoadedVae) -> torch.Tensor:
    """The fp32 decode with fp32 weights of the same latents: the reference both bf16 decoders are measured against."""
    ref = load_vae(src, dtype=torch.float32, device=vae.device)
    z, kwargs = ref.family.prepare(ref.model, latents, denormalize=True, settings=DecodeSettings())
    video = ref.family.decode(ref.model, z, **kwargs)
    del ref
    return video


def _fidelity(got: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    diff = got.float() - truth
    mse = diff.square().mean().item()
    psnr = 10 * math.log10(4.0 / mse) if mse else math.inf  # values span [-1, 1]: peak-to-peak 2
    return round(psnr, 3), round(diff.abs().max().item(), 5)
