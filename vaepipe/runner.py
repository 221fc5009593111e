"""The shared runner: latents file -> video file(s), used by `decode`, `batch` and `bench`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import __version__, startup
from . import bands as banding
from . import engine as engines
from .decode import decode_stream
from .encode import (
    EncodeOptions,
    EncodePlan,
    Encoder,
    check_frame_size,
    check_frames_folder,
    check_writable,
    plan_encode,
    with_mux,
)
from .errors import BadInput, VaepipeError
from .families import DecodeSettings, default_repo, preset_channels
from .latents import Latents, check_for_vae, read_latents
from .memory import check_decode_fits, device_available, gib
from .mux import probe_audio
from .options import DecodeOptions, parse_bytes
from .pipeline import Buffers, Jitter, LaneStats, Progress, run_lanes
from .progress import Reporter
from .segments import SegmentedEncoder, segment_lengths
from .vae import PRESETS, LoadedVae, load_vae

DEFAULT_FPS = 16.0
AUTO_HEADROOM = 0.8
"""Share of the free device memory the bands' model may plan for where no --max-vram is given: on an H100 the model
fell short of the measured peak by up to a quarter (Wan 2.2 at 704x1280 in 22 bands: 3.31 GiB modelled, 4.17 GiB
measured), and an out-of-memory mid-decode costs the whole clip."""


def output_paths(output: str | Path, batch: int) -> list[Path]:
    """`out.mp4` for one sample; `out_0.mp4`, `out_1.mp4`… for several (for a frame pattern, its folder)."""
    output = Path(output)
    if batch == 1:
        return [output]
    if "%" in output.name:
        if not output.parent.name:
            raise BadInput(f"a batch of {batch} samples writes one folder of frames per sample: put the pattern in a"
                           f" folder, such as frames/{output.name}")
        return [output.parent.with_name(f"{output.parent.name}_{b}") / output.name for b in range(batch)]
    return [output.with_name(f"{output.stem}_{b}{output.suffix}") for b in range(batch)]


class Session:
    """Holds what is worth keeping between outputs: loaded VAEs (one per source, dtype and device) and the lane
    buffers. `decode` and `batch` both run through it."""

    def __init__(self, reporter: Reporter | None = None):
        self.reporter = reporter or Reporter(quiet=True)
        self.buffers = Buffers()
        self._vaes: dict[tuple[str, torch.dtype, torch.device], LoadedVae] = {}
        self._engines: dict[tuple[int, bool, int | None], engines.Engine] = {}
        self.load_s = 0.0
        self._reported: object = None
        self._told_exact_bands = False

    def vae(self, src: str, dtype: torch.dtype, device: torch.device) -> LoadedVae:
        key = (src, dtype, device)
        if key not in self._vaes:
            startup.import_diffusers()  # (a start-up import, not the VAE's load: startup.py)
            t = time.perf_counter()
            self._vaes[key] = vae = load_vae(src, dtype=dtype, device=device)
            self.load_s += time.perf_counter() - t
            self.reporter.log(f"VAE {vae.source}, {str(dtype).removeprefix('torch.')} on {device}")
            if vae.family.streams_for(vae.model) == "whole" and not vae.family.unsupported:
                self.reporter.log(f"warning: {type(vae.model).__name__} decodes each clip whole ({vae.family.why}), so"
                                  " its frames reach the encoder only at the end and memory grows with the clip")
        return self._vaes[key]

    def prepare(self, latents: str | Path | Latents, output: str | Path, options: DecodeOptions,
                encode: EncodeOptions, *, vae: LoadedVae | None = None) -> Job:
        """Read and check everything a decode needs, before any GPU work; raise BadInput on any problem.
        `latents` is a path, or latents already read (batch reads the next job's while one decodes); `vae` one
        already loaded (the API's: a pipeline's own), else `options.vae` is loaded once per session."""
        if not isinstance(latents, Latents):
            latents = read_latents(latents)
        device = options.torch_device()
        dtype = options.torch_dtype(device)
        src = options.vae or (None if vae is not None else default_repo(latents.tensor.shape[1]))
        if src in PRESETS:  # a preset's width is known without building it
            PRESETS[src][0].check(None, tuple(latents.tensor.shape), str(latents.path), preset_channels(src))
            check_for_vae(latents, preset_channels(src))
        b, _, _, h, w = latents.tensor.shape
        if encode.fps is None and latents.fps_error:  # a bad stored fps matters only where no fps is given
            raise BadInput(latents.fps_error)
        fps = encode.fps or latents.fps or DEFAULT_FPS
        outputs = output_paths(output, b)
        for o in outputs:  # container, codec, pixel format and a writable folder, before the VAE is loaded
            plan_encode(o, width=16, height=16, fps=fps, options=encode)
            check_writable(o)
        audio = probe_audio(encode.audio) if encode.audio else None
        if options.fast:
            self.reporter.log("note: --fast is the default on GPUs now (vaepipe's engine); the flag changes nothing")
        if vae is None:
            vae = self.vae(src, dtype, device)
        if vae.family.unsupported:
            raise BadInput(f"vaepipe cannot decode with {type(vae.model).__name__}: {vae.family.unsupported}")
        vae.family.check(vae.model, tuple(latents.tensor.shape), str(latents.path), vae.z_dim)
        check_for_vae(latents, vae.z_dim)
        scale = vae.family.spatial_factor(vae.model)
        plans = [plan_encode(o, width=w * scale, height=h * scale, fps=fps, options=encode) for o in outputs]
        self._check_fits(vae, plans[0], options, latents)
        check_frame_size(plans[0])
        bands = self._bands(vae, plans[0], options, latents)
        frames = vae.family.num_frames(vae.model, latents.tensor.shape[2])
        for plan in plans:
            check_frames_folder(plan, frames)
        plans = with_mux(plans, encode, audio=audio, recorded=latents.metadata, frames=frames)
        for note in dict.fromkeys(note for plan in plans for note in plan.mux.notes):
            self.reporter.log(f"warning: {latents.path}: {note}")
        if plans[0].pad_right or plans[0].pad_bottom:
            self.reporter.log(f"frames are {w * scale}x{h * scale}: padding to even sizes for {plans[0].pix_fmt}"
                              " by repeating the last column/row (not rescaled)")
        return Job(latents=latents, vae=vae, plans=plans, options=options, bands=bands)

    def _bands(self, vae: LoadedVae, plan: EncodePlan, options: DecodeOptions, latents: Latents) -> banding.Plan | None:
        """The bands a decode runs in: those asked for, the fewest that fit --max-vram, or, where the whole frame
        would not fit in the device's free memory, the fewest that fit there; None: whole frames, as ever."""
        asked = options.bands is not None and options.bands > 1 or options.max_vram is not None
        if vae.family.cannot_band:
            if asked:
                raise BadInput(f"{type(vae.model).__name__} cannot decode in bands ({vae.family.cannot_band}): drop"
                               " --bands and --max-vram")
            return None
        if options.bands == 1 and options.max_vram is None:
            return None
        clip = band_clip(vae, tuple(latents.tensor.shape), plan.frame_shape, options,
                         engine=self._uses_engine(vae, options) and not options.exact)
        if options.bands:
            chosen = banding.plan(clip, bands=options.bands, caches=options.band_caches,
                                  why="--bands" if options.max_vram is None else "--bands (--max-vram not applied)")
        elif options.max_vram is not None:
            chosen = banding.choose(clip, parse_bytes(options.max_vram), caches=options.band_caches)
        else:
            free = device_available(vae.device)
            if vae.device.type == "cuda":
                free += torch.cuda.memory_allocated(vae.device)  # (the model counts what this process holds)
            free = int(free * AUTO_HEADROOM)
            whole, _ = clip.need(1, clip.chunks[-1], 1, "device")
            if whole <= free:
                return None
            chosen = banding.choose(clip, free, caches=options.band_caches, free=True)
            self.reporter.log(f"frames of {plan.width}x{plan.height} need about {gib(whole)} whole, {gib(free)} is "
                              f"free on {vae.device}: decoding in {chosen.bands} bands")
        return chosen

    def _check_fits(self, vae: LoadedVae, plan: EncodePlan, options: DecodeOptions, latents: Latents) -> None:
        """The lane buffers and a floor on the decoder's working memory, against what the device has (one latent
        frame per call: the engine takes more only where they fit); the buffers this session holds are freed
        before new ones are made, so they count as available."""
        config = vae.model.config
        # Channels per output pixel at the decoder's last, full-resolution stage, spread over its patch (Wan 2.2,
        # LTX); a narrow guess for configs that name it otherwise keeps this a floor.
        widths = config.get("decoder_block_out_channels") or config.get("block_out_channels") or [8]
        width = config.get("decoder_base_dim") or config.get("base_dim") or widths[0]
        patch = config.get("patch_size")
        width /= (patch if isinstance(patch, int) else 1) ** 2
        held = tuple(sum(t.numel() for t in ts) for ts in (self.buffers.vram, self.buffers.host))
        if not vae.family.cannot_band:
            width = 0  # the decoder's working memory: the bands' model (`_bands`) checks it
        factor = vae.temporal_factor
        whole = vae.family.streams_for(vae.model) == "whole"  # all frames in one call
        check_decode_fits(frame_shape=plan.frame_shape, frames_per_chunk=(options.chunk or 1) * factor,
                          frames_per_call=vae.family.num_frames(vae.model, latents.tensor.shape[2]) if whole
                          else factor, k=1 if options.sync else options.buffers, device=vae.device, dtype=vae.dtype,
                          width=width, latent_numel=latents.tensor[0].numel(), held=held)

    def run(self, job: Job, *, jitter: Jitter | None = None) -> list[dict]:
        """Decode every sample of `job` to its output; return one summary per output."""
        return [summarize(job, streamed.plan, *streamed.finish()) for streamed in self.stream(job, jitter=jitter)]

    def stream(self, job: Job, *, jitter: Jitter | None = None) -> Iterator[Streamed]:
        """Like `run`, but yield each sample once all its frames are in its encoder, before ffmpeg finishes. The
        caller must `finish()` or `abort()` each; batch finishes them on another thread while the next decodes."""
        vae, options = job.vae, job.options
        frames = vae.family.num_frames(vae.model, job.latents.tensor.shape[2])
        settings = decode_settings(options, job.latents)
        for b, plan in enumerate(job.plans):
            with torch.inference_mode():  # not held across the yield: the caller's code runs there
                z, kwargs = vae.family.prepare(vae.model, job.latents.tensor[b : b + 1],
                                               denormalize=options.denormalize and not job.latents.raw,
                                               settings=settings)
            streamed = self.stream_sample(vae, z, plan, options, progress=self.reporter.lanes(frames), jitter=jitter,
                                          decode_kwargs=kwargs, bands=job.bands)
            del z, kwargs
            yield streamed

    def decode_sample(self, vae: LoadedVae, z: torch.Tensor, plan: EncodePlan, options: DecodeOptions, *,
                      progress: Progress | None = None, jitter: Jitter | None = None,
                      decode_kwargs: dict | None = None) -> tuple[LaneStats, int]:
        """Decode one sample `z` [1, C, T, H, W], already on the VAE's device and dtype and denormalised, to
        `plan.dest`; return the lane stats (wall time from encoder start to the file in place) and the file size.
        `run` uses it per sample; `bench` calls it directly on latents held in memory. `decode_kwargs`: the rest of
        what the family's `prepare` gave (LTX's decode timestep)."""
        return self.stream_sample(vae, z, plan, options, progress=progress, jitter=jitter,
                                  decode_kwargs=decode_kwargs).finish()

    def stream_sample(self, vae: LoadedVae, z: torch.Tensor, plan: EncodePlan, options: DecodeOptions, *,
                      progress: Progress | None = None, jitter: Jitter | None = None,
                      decode_kwargs: dict | None = None, encoder_for: OpenEncoder | None = None,
                      bands: banding.Plan | None = None) -> Streamed:
        """`decode_sample` up to the point where every frame is in the encoder; the caller finishes or aborts.
        `encoder_for(plan, frames)` replaces the encoder (bench: natural frames, or none to time decoding alone);
        `decode_kwargs`: the rest of what the family's `prepare` gave (LTX's decode timestep); `bands`: the plan
        `prepare` chose (None: whole frames)."""
        t = time.perf_counter()
        if bands is not None and bands.bands == 1:  # whole frames, at most the latent frames per call that fit
            options = replace(options, chunk=options.chunk or bands.chunk)
        engine = self.engine(vae, options)
        if bands is not None and bands.bands > 1:  # one piece per call; --exact: diffusers' own modules on the bands
            if options.exact and vae.device.type == "cuda" and not self._told_exact_bands:
                self._told_exact_bands = True
                self.reporter.log("note: --exact in bands runs diffusers' own modules on each band: on GPUs their "
                                  "bits are not proven equal to diffusers' whole decode (on an H100 93 % of uint8 "
                                  "values were, none off by more than 4 levels; bit for bit on the CPU)")
            engine = None if options.exact else engine
            pieces = engine.banded(z, bands) if engine else vae.family.banded(vae.model, z, bands)
            step, frames_per_chunk = 1, bands.chunk * vae.temporal_factor
        elif engine:  # one piece per step: the engine's call of several latent frames
            pieces, step = engine.stream(z), 1
            frames_per_chunk = engine.max_frames(*z.shape[3:])
        else:
            pieces, step = decode_stream(vae.model, z, **(decode_kwargs or {})), options.chunk or 1
            frames_per_chunk = step * vae.temporal_factor
        encoder = (encoder_for or open_encoder)(plan, vae.family.num_frames(vae.model, z.shape[2]))
        try:
            with torch.inference_mode():
                stats = run_lanes(_checked_pieces(pieces, plan), encoder, device=vae.device,
                                  frame_shape=plan.frame_shape, frames_per_chunk=frames_per_chunk, chunk=step,
                                  buffers=self.buffers, k=options.buffers, sync=options.sync, progress=progress,
                                  jitter=jitter)
        except torch.OutOfMemoryError as e:
            encoder.abort()
            raise VaepipeError(f"out of GPU memory while decoding {plan.dest}: {str(e).splitlines()[0]}; one latent"
                               " frame at this size needs more than is free: free the GPU of other work, or decode"
                               " in bf16 if this was fp32") from None
        except RuntimeError as e:  # from PyTorch: a failed kernel, a corrupt model
            encoder.abort()
            raise VaepipeError(f"decoding {plan.dest} failed: {e}") from e
        except BaseException:
            encoder.abort()
            raise
        stats.bands = bands.report() if bands is not None else None
        if vae.device.type == "cuda":
            stats.peak = torch.cuda.max_memory_allocated(vae.device)
        if engine:
            stats.engine = engine.report(z.shape[3:])
            if bands is not None and bands.bands > 1:
                stats.engine["chunk"] = bands.chunk
            if engine.fallbacks and engine.fallbacks.keys() != self._reported:
                self._reported = engine.fallbacks.keys()
                self.reporter.log(f"exact: {len(engine.fallbacks)} ops run diffusers' way on this GPU (the self-check"
                                  f" found other bits): {', '.join(engine.fallbacks)}")
        return Streamed(plan=plan, encoder=encoder, stats=stats, started=t)

    def _uses_engine(self, vae: LoadedVae, options: DecodeOptions) -> bool:
        if options.engine is None:
            return vae.device.type == "cuda" and engines.supports(vae.model)
        if options.engine and not engines.supports(vae.model):
            raise BadInput(f"vaepipe's engine decodes Wan VAEs; {type(vae.model).__name__} has none: leave the"
                           " engine off")
        return options.engine

    def engine(self, vae: LoadedVae, options: DecodeOptions) -> engines.Engine | None:
        """The engine that decodes with `options` (one per VAE, policy and chunk, kept for its tuned state), or None
        for diffusers' own decoder."""
        if not self._uses_engine(vae, options):
            return None
        key = (id(vae.model), options.exact, options.chunk)
        if key not in self._engines:
            self._engines[key] = engines.Engine(vae.model, exact=options.exact, chunk=options.chunk)
        return self._engines[key]


def band_clip(vae: LoadedVae, shape: tuple[int, ...], frame_shape: tuple[int, int, int], options: DecodeOptions, *,
              engine: bool) -> banding.Clip:
    """What the bands' memory model needs of one sample of latents `shape` decoded to frames of `frame_shape`
    (padded [H, W, 3]) with `options`, by the engine (fast policy) or diffusers' own modules."""
    chunks = (options.chunk,) if options.chunk else engines.CHUNKS if engine else (1,)
    _, c, t, h, w = shape
    itemsize = vae.dtype.itemsize
    frame_bytes = math.prod(frame_shape)
    slots = 1 if options.sync else options.buffers
    fixed = (sum(p.numel() * p.element_size() for p in vae.model.parameters())
             + slots * chunks[0] * vae.temporal_factor * frame_bytes + 3 * c * t * h * w * itemsize)
    return banding.Clip(shape=vae.family.tail_shape(vae.model), height=h, width=w, latent_frames=t,
                        itemsize=itemsize, fixed=fixed, frame_bytes=frame_bytes, temporal=vae.temporal_factor,
                        activation_maps=banding.ACTIVATION_MAPS["engine" if engine else "diffusers"], chunks=chunks)


def open_encoder(plan: EncodePlan, frames: int) -> Encoder | SegmentedEncoder:
    """One ffmpeg, or one per segment where --encoders and the clip call for it (segments.py)."""
    lengths = segment_lengths(plan, frames)
    return Encoder(plan) if len(lengths) == 1 else SegmentedEncoder(plan, lengths)


OpenEncoder = Callable[[EncodePlan, int], "Encoder | SegmentedEncoder"]
"""Makes the encode lane's sink for a plan and a frame count: write(frames), finish(), abort(), output_bytes()."""


@dataclass(slots=True)
class Streamed:
    """One sample whose frames are all in its encoder: `finish()` publishes the file, `abort()` drops it."""

    plan: EncodePlan
    encoder: Encoder | SegmentedEncoder
    stats: LaneStats
    started: float

    def finish(self) -> tuple[LaneStats, int]:
        """Wait for ffmpeg and move the file into place (cleaning up on failure); return the stats and its size."""
        t = time.perf_counter()
        self.stats.replaced = self.plan.dest.is_file()  # a PNG pattern names no one file
        self.encoder.finish()
        self.stats.drain_s = time.perf_counter() - t
        self.stats.encoders = getattr(self.encoder, "encoders", 1)
        self.stats.wall_s = time.perf_counter() - self.started  # from encoder start to the file in place
        return self.stats, self.encoder.output_bytes()

    def abort(self) -> None:
        self.encoder.abort()


@dataclass(slots=True)
class Job:
    latents: Latents
    vae: LoadedVae
    plans: list[EncodePlan]
    options: DecodeOptions
    bands: banding.Plan | None = None


def decode_settings(options: DecodeOptions, latents: Latents) -> DecodeSettings:
    """Decode timestep and noise scale: the option, else the latents file's, else the pipeline's default (None)."""
    stored = latents.decode_settings
    return DecodeSettings(
        timestep=options.decode_timestep if options.decode_timestep is not None else stored.get("decode_timestep"),
        noise_scale=(options.decode_noise_scale if options.decode_noise_scale is not None
                     else stored.get("decode_noise_scale")))


def _checked_pieces(pieces, plan: EncodePlan):
    for piece in pieces:
        if tuple(piece.shape[3:]) != (plan.height, plan.width):
            raise VaepipeError(f"the VAE made {tuple(piece.shape[3:])} frames, expected {(plan.height, plan.width)}:"
                               " its spatial scale factor is not the one in its config")
        yield piece


def summarize(job: Job, plan: EncodePlan, stats: LaneStats, size: int) -> dict:
    return {
        "output": str(plan.dest), "bytes": size, "frames": stats.frames, "width": plan.width,
        "height": plan.height, "fps": plan.fps, "codec": plan.codec, "pix_fmt": plan.pix_fmt,
        "vae": job.vae.source, "dtype": str(job.vae.dtype).removeprefix("torch."), "device": str(job.vae.device),
        "audio": str(plan.mux.audio.path) if plan.mux.audio else None, "tags": [k for k, _ in plan.mux.tags],
        "mode": "sync" if job.options.sync else "pipelined", "exact": job.options.exact,
        "decoder": stats.engine or {"name": "diffusers"}, "buffers": 1 if job.options.sync else job.options.buffers,
        "bands": stats.bands["bands"] if stats.bands else 1, "band_plan": stats.bands,
        "peak_gib": round(stats.peak / 2**30, 3) if stats.peak is not None else None,
        "wall_s": round(stats.wall_s, 4), "busy_s": {k: round(v, 4) for k, v in stats.busy_s.items()},
        "encoder_drain_s": round(stats.drain_s, 4), "encoders": stats.encoders,
        "decode_utilization": round(stats.decode_utilization, 4), "replaced": stats.replaced, "vaepipe": __version__,
        "first_call_extra_s": _rounded(startup.first_call_extra_s(stats.spans, stats.chunk_frames)),
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
