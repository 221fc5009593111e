"""The modes bench times, each a job that decodes the same latents into a video: `naive` (what a diffusers user
does today), `sync` and `pipelined` (vaepipe's lanes without and with overlap).

A mode is a name in MODES and a branch in `prepare_case` that builds its job: a function that runs once per timed
run and returns a Sample (wall time, per-lane busy times, spans for the trace).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..encode import plan_encode
from ..latents import denormalize
from ..runner import DEFAULT_FPS, DecodeOptions, Session
from ..vae import LoadedVae
from .measure import Case, Sample, synchronize

if TYPE_CHECKING:
    from .options import BenchOptions, Shape

MODES = ("naive", "sync", "pipelined")
NAIVE_STAGES = ("decode", "postprocess", "export")
"""The naive path's steps, drawn as its three lanes: vae.decode, postprocess_video(np), export_to_video."""
NAIVE_ENCODER = "diffusers export_to_video defaults: imageio-ffmpeg libx264, quality 5 (CRF 25), yuv420p"


def prepare_case(shape: Shape, latents: torch.Tensor, vae: LoadedVae, naive_vae: LoadedVae,
                 sessions: dict[str, Session], decode_options: DecodeOptions, options: BenchOptions, out: Path) -> Case:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor: naive runs under no_grad, as pipelines do
        z = denormalize(latents.to(vae.device, vae.dtype), vae.model.config)
    outputs = {mode: out / "videos" / f"{shape.label}-{mode}.mp4" for mode in options.modes}
    jobs: dict[str, Callable[[], Sample]] = {}
    for mode in options.modes:
        if mode == "naive":
            jobs[mode] = lambda dest=outputs[mode]: naive_job(naive_vae, z, dest)
        else:
            plan = plan_encode(outputs[mode], width=shape.width, height=shape.height, fps=DEFAULT_FPS,
                               options=options.encode)
            opts = dataclasses.replace(decode_options, sync=mode == "sync")
            jobs[mode] = lambda session=sessions[mode], plan=plan, opts=opts: vaepipe_job(session, vae, z, plan,
                                                                                       opts)
    return Case(shape=shape, latent_shape=tuple(latents.shape), jobs=jobs, outputs=outputs)


def naive_job(vae: LoadedVae, z: torch.Tensor, dest: Path) -> Sample:
    """What a diffusers Wan pipeline and its docs do: decode the whole clip, postprocess_video to numpy, then
    `export_to_video(frames, path, fps=16)`."""
    from diffusers.utils import export_to_video
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=int(vae.model.config.get("scale_factor_spatial") or 8))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.stem}.part{dest.suffix}")  # imageio picks the format from the suffix
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            video = vae.model.decode(z, return_dict=False)[0]
        synchronize(vae.device)  # postprocess_video's .cpu() waits for the decode anyway; this only splits timings
        t1 = time.perf_counter()
        frames = processor.postprocess_video(video, output_type="np")[0]
        del video
        t2 = time.perf_counter()
        export_to_video(frames, str(part), fps=int(DEFAULT_FPS))
        os.replace(part, dest)
        t3 = time.perf_counter()
    finally:
        part.unlink(missing_ok=True)
    stages = dict(zip(NAIVE_STAGES, (t1 - t0, t2 - t1, t3 - t2), strict=True))
    steps = zip(NAIVE_STAGES, ("vae.decode", "postprocess_video", "export_to_video"), (t0, t1, t2), (t1, t2, t3),
                strict=True)
    spans = [(stage, what, a - t0, b - t0) for stage, what, a, b in steps]
    return Sample(wall_s=t3 - t0, stages_s=stages, spans=spans)


def vaepipe_job(session: Session, vae: LoadedVae, z: torch.Tensor, plan, options: DecodeOptions) -> Sample:
    t0 = time.perf_counter()
    streamed = session.stream_sample(vae, z, plan, options)
    lanes_end = time.perf_counter()
    lanes_s = streamed.stats.wall_s  # run_lanes' own wall time, before finish() makes it the whole job's
    stats, _ = streamed.finish()
    end = time.perf_counter()
    # Spans count from the lanes' start; shift them to the job's start (encoder launch) and add ffmpeg's flush
    # after the last frame, which the lanes do not see but the wall time includes.
    shift = lanes_end - lanes_s - t0
    spans = [(lane, f"chunk {chunk}", start + shift, stop + shift) for lane, chunk, start, stop in stats.spans]
    spans.append(("encode", "ffmpeg finish", lanes_end - t0, end - t0))
    stages = dict(stats.busy_s) | {"finish": end - lanes_end}
    return Sample(wall_s=end - t0, stages_s=stages, spans=spans)


def vaepipe_encoder(options: BenchOptions) -> str:
    return f"vaepipe Encoder: libx264 CRF {options.crf} {options.preset} yuv420p (BT.709), bit-exact mux"
