"""Bands against whole frames, and against diffusers' tiled decode, on the same latents and weights in one process
(`vaepipe bench --bands 1,2,4,8`):

    engine              the engine's fast policy on whole frames (bands 1): the reference of the rows below
    engine B device     the engine in B bands, one window for the clip: each band's caches live while it runs
    engine B host       the same in windows of a few latent frames, every band's caches in pinned host memory between
    diffusers B         diffusers' own modules in B bands (what --exact runs in bands) against diffusers' whole decode
    enable_tiling       diffusers' tiled decode (`vae.enable_tiling()`), against diffusers' whole decode

Each row: the median decode-lane time (frames into a uint8 buffer on the device, as the lanes take them) after a
warm-up, the peak of `torch.cuda.max_memory_allocated` over the call with the weights and latents included, what the
bands' memory model predicted, and the frames against the reference: the share of uint8 values equal, the largest
difference in levels and the PSNR of the float video (diffusers' rows).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from .. import bands as banding
from ..decode import decode_stream, to_uint8_frames
from ..engine import Engine
from ..errors import BadInput
from ..families import DecodeSettings
from ..progress import Reporter
from ..runner import DecodeOptions, band_clip
from ..vae import LoadedVae
from . import decoders
from .measure import seconds

HOST_WINDOW = 4
"""Latent frames per window of the host-caches rows."""


def band_table(vae: LoadedVae, latents: torch.Tensor, counts: list[int], runs: int, reporter: Reporter, *,
               diffusers: list[int] | None = None, truth: str | None = None) -> list[dict]:
    """The rows above for normalised `latents` [1, C, T, h, w]; diffusers' rows for band counts `diffusers` (None:
    `counts`; []: none, nor enable_tiling). `truth`: the VAE's source, to give every row its PSNR (uint8) against
    the frames of an fp32 decode with fp32 weights."""
    device = vae.device
    truth_frames = _truth(truth, latents, vae) if truth else None
    with torch.inference_mode():
        z, _ = vae.family.prepare(vae.model, latents, denormalize=True, settings=DecodeSettings())
        h, w = z.shape[3] * vae.family.spatial_factor(vae.model), z.shape[4] * vae.family.spatial_factor(vae.model)
        frames = vae.family.num_frames(vae.model, z.shape[2])
        out = torch.empty((frames, h, w, 3), dtype=torch.uint8, device=device)
        engine = Engine(vae.model, exact=False)
        rows = []

        def add(name: str, run: Callable[[], object], want: torch.Tensor | None, plan: banding.Plan | None = None,
                video: Callable[[], torch.Tensor] | None = None, want_video: torch.Tensor | None = None) -> None:
            row = {"decoder": name, **_time(run, runs, device)}
            if plan is not None:
                row.update(bands=plan.bands, chunk=plan.chunk, window=plan.window, caches=plan.caches,
                           model_gib=round(plan.need / 2**30, 3))
            if want is not None:
                row.update(_frames_against(out, want))
            if video is not None:
                row["psnr_db"] = _psnr(video(), want_video)
            if truth_frames is not None:
                row["psnr_fp32_db"] = _psnr(out.float() / 127.5, truth_frames.float() / 127.5)
            reporter.log(f"bands: {row}")
            rows.append(row)

        def engine_lane(plan: banding.Plan | None) -> Callable[[], None]:
            def run() -> None:
                f = 0
                for piece in engine.banded(z, plan) if plan else engine.stream(z):
                    n = piece.shape[2]
                    piece.write_uint8(out[f : f + n])
                    f += n
            return run

        options = DecodeOptions()
        clip = band_clip(vae, tuple(z.shape), (h, w, 3), options, engine=True)
        add("engine", engine_lane(None), None)
        want = out.clone()
        engine.ctx.tune_cudnn = False  # whole frames with cuDNN's untimed choices, as the bands run: what differs
        engine_lane(None)()
        engine.ctx.tune_cudnn = True
        untuned = out.clone()
        rows[-1]["untuned_equal"] = _frames_against(untuned, want)["uint8_equal"]
        for count in counts:
            for caches in ("device", "host"):
                if count == 1:
                    continue
                plan = banding.plan(clip, bands=count, caches=caches, window=HOST_WINDOW if caches == "host" else None,
                                    chunk=engine.chunk_for(*z.shape[3:]))
                add(f"engine {count} {caches}", engine_lane(plan), want, plan)
                rows[-1]["untuned_equal"] = _frames_against(out, untuned)["uint8_equal"]
        del want, untuned
        if diffusers == []:
            return rows
        whole = torch.cat(list(decode_stream(vae.model, z)), dim=2)
        to_uint8_frames(whole, out)
        want = out.clone()
        clip = band_clip(vae, tuple(z.shape), (h, w, 3), options, engine=False)

        def diffusers_lane(plan: banding.Plan) -> Callable[[], None]:
            def run() -> None:
                f = 0
                for piece in vae.family.banded(vae.model, z, plan):
                    n = piece.shape[2]
                    piece.write_uint8(out[f : f + n])
                    f += n
            return run

        for count in counts if diffusers is None else diffusers:
            if count > 1:
                plan = banding.plan(clip, bands=count)
                add(f"diffusers {count}", diffusers_lane(plan), want, plan)
        model = vae.model
        model.enable_tiling()
        try:
            tiled: list[torch.Tensor] = []

            def tiled_lane() -> None:
                tiled[:] = [model.decode(z).sample]
                to_uint8_frames(tiled[0], out)

            add("enable_tiling", tiled_lane, want, video=lambda: tiled[0], want_video=whole)
        finally:
            model.disable_tiling()
    return rows


def _truth(src: str, latents: torch.Tensor, vae: LoadedVae) -> torch.Tensor:
    """uint8 frames of the decoders table's truth: diffusers' fp32 decode with fp32 weights."""
    with torch.inference_mode():
        video = decoders.fp32_truth(src, latents, vae)
        frames = torch.empty((video.shape[2], *video.shape[3:], 3), dtype=torch.uint8, device=video.device)
        to_uint8_frames(video, frames)
    return frames


def _frames_against(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got.int() - want.int()).abs()
    return {"uint8_equal": round(1 - diff.count_nonzero().item() / diff.numel(), 6),
            "max_levels": int(diff.max().item())}


def _psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    mse = (got.float() - want.float()).square().mean().item()
    return round(10 * math.log10(4.0 / mse), 2) if mse else math.inf


def _time(call: Callable[[], object], runs: int, device: torch.device) -> dict:
    def once() -> float:
        return seconds(call, device)

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first = once()
    first_peak = peak()  # (cuDNN's tuning of new shapes included)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [once() for _ in range(runs)]
    return {"first_call_s": round(first, 4), "median_s": round(statistics.median(times), 4),
            "peak_gib": peak(), "first_peak_gib": first_peak}



def markdown(rows: list[dict]) -> str:
    """The table for docs/benchmarks.md."""
    lines = ["| decoder | bands | caches | window | median s | first s | peak GiB | first-call peak | model GiB | "
             "uint8 equal | max levels | equal untuned | PSNR dB | PSNR vs fp32 |", "|---" * 14 + "|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r.get('bands', '')} | {r.get('caches', '')} | {r.get('window', '')} | "
                     f"{r['median_s']} | {r['first_call_s']} | {r['peak_gib']} | {r['first_peak_gib']} | "
                     f"{r.get('model_gib', '')} | {r.get('uint8_equal', '')} | {r.get('max_levels', '')} | "
                     f"{r.get('untuned_equal', '')} | "
                     f"{r.get('psnr_db', '')} | {r.get('psnr_fp32_db', '')} |")
    return "\n".join(lines)


def run_band_bench(vae_src: str, shapes: list[str], counts: list[int], runs: int, options: DecodeOptions,
                   out: Path, reporter: Reporter, *, truth: bool = False) -> list[dict]:
    """`vaepipe bench --bands`: a band table per shape, written to OUT/bands.json and OUT/bands.md."""
    from ..families import synthetic_latents
    from ..vae import load_vae

    device = options.torch_device()
    vae = load_vae(vae_src, dtype=options.torch_dtype(device), device=device)
    if vae.family.cannot_band:
        raise BadInput(f"{type(vae.model).__name__} cannot decode in bands ({vae.family.cannot_band})")
    out.mkdir(parents=True, exist_ok=True)
    tables, text = [], []
    for shape in shapes:
        rows = band_table(vae, synthetic_latents(vae.model, shape, seed=0), counts, runs, reporter,
                          truth=vae_src if truth else None)
        tables.append({"vae": vae_src, "shape": shape, "device": torch.cuda.get_device_name(device)
                       if device.type == "cuda" else "cpu", "rows": rows})
        text.append(f"### {vae_src} {shape} ({tables[-1]['device']})\n\n{markdown(rows)}\n")
    (out / "bands.json").write_text(json.dumps(tables, indent=2) + "\n")
    (out / "bands.md").write_text("\n".join(text))
    return tables
