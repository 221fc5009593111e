"""The modes bench times. Each is a job that turns the same latents into a video (or, for the one-lane modes, does
that lane's part alone) and returns a Sample (wall time, per-lane busy times, spans for the trace):

    naive       what a diffusers user does today: vae.decode, postprocess_video, export_to_video
    fastvae     the same user path with fastvae's decoder in place of vae.decode (a peer; pip install fastvae)
    sync        vaepipe's chunks on one stream, decode, copy and encode one after another
    pipelined   vaepipe's three overlapped lanes (on GPUs: the engine, fast policy, the default)
    exact       pipelined with --exact: frames bit-identical to diffusers' vae.decode
    decode      the decode and copy lanes alone (no encoder): what the GPU side costs
    encode      the encoder lane alone, fed frames from memory as fast as it takes them

A new mode is a name in options.MODES (DEFAULT_MODES if it runs by default) and a branch in `prepare_case` that builds
its job. What the encoder is given is the case's content: `Feed` swaps the decoded frames for natural ones on their way
into the encoder (the decode and copy lanes still run for real) and records the frames each mode's encoder got, the
reference its video's PSNR is measured against.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..encode import EncodePlan, plan_encode
from ..runner import DEFAULT_FPS, DecodeOptions, Session, open_encoder
from ..vae import LoadedVae
from .measure import Case, Sample, synchronize
from .options import BenchOptions, Shape

NAIVE_STAGES = ("decode", "postprocess", "export")
"""The naive path's steps, drawn as its three lanes: vae.decode, postprocess_video(np), export_to_video."""
NAIVE_ENCODER = "diffusers export_to_video defaults: imageio-ffmpeg libx264, quality 5 (CRF 25), yuv420p"


class Feed:
    """The encode lane's sink in bench: the encoder, given `frames` (natural content) in place of what was decoded,
    same count and size; `keep` records what the encoder got (for PSNR), `None` encoder times the lanes alone."""

    def __init__(self, encoder, plan: EncodePlan, frames: torch.Tensor | None, keep: list | None):
        self.encoder, self.plan, self.frames, self.keep, self.pos = encoder, plan, frames, keep, 0

    def write(self, decoded: torch.Tensor) -> None:
        n = decoded.shape[0]
        given = decoded if self.frames is None else self.frames[self.pos : self.pos + n]
        if self.keep is not None:
            self.keep.append(given.clone())
        if self.encoder is not None:
            self.encoder.write(given)
        self.pos += n

    def finish(self) -> Path:
        return self.encoder.finish() if self.encoder is not None else self.plan.dest

    def abort(self) -> None:
        if self.encoder is not None:
            self.encoder.abort()

    def output_bytes(self) -> int:
        return self.encoder.output_bytes() if self.encoder is not None else 0

    @property
    def encoders(self) -> int:
        return getattr(self.encoder, "encoders", 1)


def prepare_case(shape: Shape, content: str, encoders: int | str, z: torch.Tensor, vae: LoadedVae,
                 naive_vae: LoadedVae, sessions: dict[str, Session], decode_options: DecodeOptions,
                 options: BenchOptions, out: Path, natural: torch.Tensor | None, kwargs: dict) -> Case:
    """One table: every mode on the same denormalised latents `z`, the encoder given `content`; `kwargs`: the rest
    of what the family's `prepare` gave (LTX's decode timestep)."""
    tag = f"{shape.label}-{content}-e{encoders}"
    outputs = {mode: out / "videos" / f"{tag}-{mode}{'.mp4' if mode == 'naive' else options.suffix}"
               for mode in options.modes}
    case = Case(shape=shape, content=content, encoders=encoders, latent_shape=tuple(z.shape), jobs={},
                outputs=outputs)
    encode = options.encode_with(encoders)
    for mode in options.modes:
        keep = case.references.setdefault(mode, [])
        if mode in ("naive", "fastvae"):
            floats = None if natural is None else (natural.numpy().astype(np.float32) + 0.5) / 255
            decode = fastvae_decode(naive_vae, z) if mode == "fastvae" else None
            case.jobs[mode] = lambda dest=outputs[mode], keep=keep, floats=floats, decode=decode: naive_job(
                naive_vae, z, dest, floats, keep, kwargs, decode)
            continue
        plan = plan_encode(outputs[mode], width=shape.width, height=shape.height, fps=DEFAULT_FPS, options=encode)
        if mode == "encode":
            # Noise: the frames the VAE makes, decoded once here, before any timing.
            frames = natural if natural is not None else decoded_frames(sessions["pipelined"], vae, z, plan,
                                                                       decode_options, kwargs)
            case.jobs[mode] = lambda plan=plan, keep=keep, frames=frames: encode_job(
                plan, frames, keep, (options.chunk or 1) * vae.temporal_factor)
            continue
        opts = dataclasses.replace(decode_options, sync=mode == "sync", exact=mode == "exact")
        session = sessions["sync" if mode == "sync" else "pipelined"]

        def feed(plan: EncodePlan, frames: int, keep=keep, lane_only=mode == "decode") -> Feed:
            # Record only until the reference is whole (the warm-up run): later runs pay no copies.
            recording = keep if sum(len(k) for k in keep) < frames else None
            return Feed(None if lane_only else open_encoder(plan, frames), plan, natural, recording)

        case.jobs[mode] = lambda session=session, plan=plan, opts=opts, feed=feed: vaepipe_job(session, vae, z, plan,
                                                                                             opts, feed, kwargs)
    return case


def naive_job(vae: LoadedVae, z: torch.Tensor, dest: Path, natural: np.ndarray | None = None,
              keep: list | None = None, kwargs: dict | None = None,
              decode: Callable[[], torch.Tensor] | None = None) -> Sample:
    """What a diffusers Wan pipeline and its docs do: decode the whole clip, postprocess_video to numpy, then
    `export_to_video(frames, path, fps=16)`. With `natural` (floats that export_to_video turns back into exactly the
    natural frames), those go to export_to_video in place of the decoded ones; `decode` replaces vae.decode (a
    peer's decoder)."""
    from diffusers.utils import export_to_video
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=int(vae.model.config.get("scale_factor_spatial") or 8))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.stem}.part{dest.suffix}")  # imageio picks the format from the suffix
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            video = decode() if decode else vae.family.decode(vae.model, z, **(kwargs or {}))
        synchronize(vae.device)  # postprocess_video's .cpu() waits for the decode anyway; this only splits timings
        t1 = time.perf_counter()
        frames = processor.postprocess_video(video, output_type="np")[0]
        del video
        if natural is not None:
            frames = natural
        t2 = time.perf_counter()
        # macro_block_size=1: imageio would otherwise resize frames to multiples of 16 (a different video).
        export_to_video(frames, str(part), fps=int(DEFAULT_FPS), macro_block_size=1)
        os.replace(part, dest)
        t3 = time.perf_counter()
    finally:
        part.unlink(missing_ok=True)
    if keep is not None and not keep:
        keep.append(torch.from_numpy((frames * 255).astype(np.uint8)))  # as export_to_video converts them
    stages = dict(zip(NAIVE_STAGES, (t1 - t0, t2 - t1, t3 - t2), strict=True))
    steps = zip(NAIVE_STAGES, ("vae.decode", "postprocess_video", "export_to_video"), (t0, t1, t2), (t1, t2, t3),
                strict=True)
    spans = [(stage, what, a - t0, b - t0) for stage, what, a, b in steps]
    return Sample(wall_s=t3 - t0, stages_s=stages, spans=spans)


def fastvae_decode(vae: LoadedVae, z: torch.Tensor) -> Callable[[], torch.Tensor]:
    """fastvae's decoder as its README has users call it (built once, here, before any timing)."""
    from fastvae import FastVAEDecoder

    decoder = FastVAEDecoder.from_vae(vae.model).to(vae.device)
    return lambda: decoder.decode(z)


def vaepipe_job(session: Session, vae: LoadedVae, z: torch.Tensor, plan, options: DecodeOptions,
                feed: Callable[[EncodePlan, int], Feed] | None = None, kwargs: dict | None = None) -> Sample:
    t0 = time.perf_counter()
    streamed = session.stream_sample(vae, z, plan, options, encoder_for=feed, decode_kwargs=kwargs)
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
    return Sample(wall_s=end - t0, stages_s=stages, spans=spans, encoders=stats.encoders)


def decoded_frames(session: Session, vae: LoadedVae, z: torch.Tensor, plan: EncodePlan,
                   options: DecodeOptions, kwargs: dict | None = None) -> torch.Tensor:
    """The frames the lanes hand the encoder, decoded once into memory (no encoder runs)."""
    keep: list[torch.Tensor] = []
    session.stream_sample(vae, z, plan, options, encoder_for=lambda p, n: Feed(None, p, None, keep),
                          decode_kwargs=kwargs).finish()
    return torch.cat(keep)


def encode_job(plan: EncodePlan, frames: torch.Tensor, keep: list, chunk: int) -> Sample:
    """The encoder lane alone: `frames` written `chunk` at a time, as fast as the encoder takes them."""
    if not keep:
        keep.append(frames)
    t0 = time.perf_counter()
    encoder = open_encoder(plan, frames.shape[0])
    try:
        spans = []
        for i in range(0, frames.shape[0], chunk):
            t = time.perf_counter()
            encoder.write(frames[i : i + chunk])
            spans.append(("encode", f"chunk {i // chunk}", t - t0, time.perf_counter() - t0))
    except BaseException:
        encoder.abort()
        raise
    fed = time.perf_counter()
    encoder.finish()
    end = time.perf_counter()
    spans.append(("encode", "ffmpeg finish", fed - t0, end - t0))
    stages = {"decode": 0.0, "copy": 0.0, "encode": fed - t0, "finish": end - fed}
    return Sample(wall_s=end - t0, stages_s=stages, spans=spans, encoders=getattr(encoder, "encoders", 1))


def vaepipe_encoder(options: BenchOptions, encoders: int | str = "auto") -> str:
    return (f"vaepipe Encoder: {options.codec} CRF {options.crf} {options.preset} (BT.709), --encoders {encoders},"
            " bit-exact mux")
