"""Benchmark: what a diffusers user does today (`naive`) against vaepipe's chunks on one stream (`sync`) and its
three overlapped lanes (`pipelined`), on the same denormalised latents, in one process.

    per shape:  load latents -> warm-up (each mode once) -> N runs, modes interleaved in each run
                -> one extra profiled run per mode (GPU kernel utilization; the timed runs stay unprofiled)

Wall time is "latents in memory -> video closed on disk". Results go to the terminal (a Rich table), bench.json
and bench.md; `--trace` writes one Chrome/Perfetto trace per shape and mode, `--plot` a PNG timeline per shape.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .encode import EncodeOptions, ffmpeg_exe, output_sha256, plan_encode
from .errors import BadInput
from .families import DecodeSettings, synthetic_latents
from .latents import parse_size
from .pipeline import LANES
from .progress import Reporter
from .runner import DEFAULT_FPS, DecodeOptions, Session
from .vae import DTYPES, LoadedVae

MODES = ("naive", "sync", "pipelined")
DEFAULT_SHAPES = ("480x832x81", "720x1280x81")
NAIVE_STAGES = ("decode", "postprocess", "export")
"""The naive path's steps, drawn as its three lanes: vae.decode, postprocess_video(np), export_to_video."""
NAIVE_ENCODER = "diffusers export_to_video defaults: imageio-ffmpeg libx264, quality 5 (CRF 25), yuv420p"
TARGETS = {"wall_over_decode": 1.03, "kernel_utilization": 0.98, "memory_growth": 1.05}
_JOB = "vaepipe.bench.job"  # the profiler annotation around one job: the window kernel utilization is taken over


@dataclass(kw_only=True, slots=True)
class BenchOptions:
    vae: str = "random:wan2.1"
    """The VAE to time (a preset, a folder, a cached repo id or a checkpoint)."""
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    """Video sizes HEIGHTxWIDTHxFRAMES; synthetic N(0, 1) latents of the matching latent size."""
    dtype: str | None = None
    """bf16, fp16 or fp32; None: bf16 on CUDA, fp32 on the CPU."""
    device: str | None = None
    """cuda, cuda:N or cpu; None: cuda when there is one."""
    runs: int = 5
    """Timed runs per mode and shape, after one warm-up."""
    modes: tuple[str, ...] = MODES
    """Which of naive, sync, pipelined to run."""
    chunk: int = 1
    """Latent frames per pipeline step (sync and pipelined)."""
    buffers: int = 2
    """Slots per lane (pipelined)."""
    out: Path = Path("bench")
    """Where bench.json, bench.md, the videos, traces and plots go."""
    trace: bool = False
    """Write a Chrome/Perfetto trace per shape and mode."""
    plot: bool = False
    """Write a PNG timeline per shape (needs matplotlib)."""
    profile: bool = True
    """One extra run per mode under the torch profiler for GPU kernel utilization (CUDA only)."""
    crf: int = 18
    """libx264 CRF for sync and pipelined."""
    preset: str = "medium"
    """libx264 preset for sync and pipelined: the encoder's lookahead is what the pipelined wall waits for last."""
    fast: bool = False
    """sync and pipelined take vaepipe's --fast path (channels-last convs, cuDNN autotuning for every mode)."""

    @property
    def encode(self) -> EncodeOptions:
        return EncodeOptions(codec="h264", crf=self.crf, preset=self.preset)

    def __post_init__(self) -> None:
        if not 1 <= self.runs <= 100:
            raise BadInput(f"runs must be in 1..100, got {self.runs}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes or len(set(self.modes)) != len(self.modes):
            raise BadInput(f"modes must be distinct names among {', '.join(MODES)}, got {','.join(self.modes)!r}")
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise BadInput(f"shapes must be distinct HEIGHTxWIDTHxFRAMES values, got {','.join(self.shapes)!r}")
        for shape in self.shapes:
            Shape.parse(shape)
        DecodeOptions(vae=self.vae, dtype=self.dtype, device=self.device, chunk=self.chunk, buffers=self.buffers)
        plan_encode("check.mp4", width=16, height=16, fps=DEFAULT_FPS, options=self.encode)
        if "naive" in self.modes and importlib.util.find_spec("imageio") is None:
            raise BadInput("mode naive runs diffusers' export_to_video, which needs imageio: pip install imageio"
                           " (or 'vaepipe[naive]'), or leave naive out of --modes")
        if self.plot and importlib.util.find_spec("matplotlib") is None:
            raise BadInput("--plot needs matplotlib: pip install matplotlib (or 'vaepipe[plot]'), or drop --plot")

    def command(self, dtype: str) -> str:
        """The command line that repeats this benchmark."""
        parts = ["vaepipe bench", f"--vae {self.vae}", f"--shape {','.join(self.shapes)}", f"--dtype {dtype}",
                 f"--runs {self.runs}", f"--modes {','.join(self.modes)}", f"--out {self.out}"]
        if self.device:
            parts.append(f"--device {self.device}")
        if self.chunk != 1:
            parts.append(f"--chunk {self.chunk}")
        if self.buffers != 2:
            parts.append(f"--buffers {self.buffers}")
        if (self.crf, self.preset) != (18, "medium"):
            parts.append(f"--crf {self.crf} --preset {self.preset}")
        if self.fast:
            parts.append("--fast")
        parts += [flag for flag, on in (("--trace", self.trace), ("--plot", self.plot),
                                        ("--no-profile", not self.profile)) if on]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Shape:
    height: int
    width: int
    frames: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        return cls(*parse_size(text, name="shape"))

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


@dataclass(kw_only=True, slots=True)
class Sample:
    """One timed job."""

    wall_s: float
    stages_s: dict[str, float]
    spans: list[tuple[str, str, float, float]]
    """(lane, what, start, end): one span per chunk and lane ("chunk 3"), seconds since the job started."""
    peak_bytes: int | None = None
    reserved_bytes: int | None = None


@dataclass(kw_only=True, slots=True)
class _Case:
    """One shape: the latents all modes decode, and one job function per mode."""

    shape: Shape
    latent_shape: tuple[int, ...]
    jobs: dict[str, Callable[[], Sample]]
    outputs: dict[str, Path]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    warmup_s: dict[str, float] = field(default_factory=dict)
    utilization: dict[str, float | None] = field(default_factory=dict)
    utilization_kernels: dict[str, float | None] = field(default_factory=dict)
    profiled_wall_s: dict[str, float | None] = field(default_factory=dict)


def run_bench(options: BenchOptions, reporter: Reporter) -> dict:
    """Run the benchmark, write bench.json and bench.md (plus traces and plots when asked) under `options.out`,
    and return the report that bench.json holds."""
    decode_options = DecodeOptions(vae=options.vae, dtype=options.dtype, device=options.device,
                                   chunk=options.chunk, buffers=options.buffers, fast=options.fast)
    device = decode_options.torch_device()
    dtype = decode_options.torch_dtype(device)
    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
    ffmpeg_exe()  # fail now, not after the warm-up, when there is no ffmpeg
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    # One session per vaepipe mode, so each keeps its own lane buffers across runs (sync uses one slot).
    sessions = {"sync": Session(reporter), "pipelined": Session(reporter)}
    vae = sessions["pipelined"].vae(options.vae, dtype, device)
    naive_vae = vae
    report = {
        "vaepipe": __version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": options.command(dtype_name), "environment": environment(device),
        "settings": {"vae": vae.source, "dtype": dtype_name, "device": str(device), "runs": options.runs,
                     "warmup_runs": 1, "modes": list(options.modes), "chunk": options.chunk,
                     "buffers": options.buffers, "fast": options.fast, "fps": DEFAULT_FPS,
                     "latents": "N(0, 1), seed 0, denormalised",
                     "encoder": f"libx264 CRF {options.crf} {options.preset} yuv420p (BT.709)",
                     "naive_encoder": NAIVE_ENCODER, "profiled": options.profile and device.type == "cuda"},
        "load_s": round(sessions["pipelined"].load_s, 3), "results": [],
    }
    reporter.log(f"model load {report['load_s']:.2f} s; timing {', '.join(options.modes)} on {device}"
                 f" ({report['environment']['device']}), {options.runs} timed run(s) after one warm-up")
    # All latents first: a shape that does not fit the VAE fails now, not after minutes of timing.
    latents = {text: synthetic_latents(vae.model, text, seed=0) for text in options.shapes}
    for text in options.shapes:
        case = _prepare(Shape.parse(text), latents[text], vae, naive_vae, sessions, decode_options, options, out)
        _time(case, options, device, reporter)
        result = _result(case, vae, options)
        report["results"].append(result)
        if options.trace:
            for mode in options.modes:
                path = out / f"trace-{case.shape.label}-{mode}.json"
                lanes = NAIVE_STAGES if mode == "naive" else LANES
                title = f"vaepipe bench {mode} {case.shape.label}"
                path.write_text(json.dumps(chrome_trace(case.samples[mode][-1].spans, lanes, title=title)))
                result["modes"][mode]["trace"] = path.name
        if options.plot:
            path = out / f"timeline-{case.shape.label}.png"
            plot_timeline({m: case.samples[m][-1] for m in options.modes}, path, title=f"{case.shape.label},"
                          f" {dtype_name}, {report['environment']['device']}")
            result["timeline"] = path.name
    report["memory"] = memory_check(report["results"])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    return report


def _prepare(shape: Shape, latents: torch.Tensor, vae: LoadedVae, naive_vae: LoadedVae, sessions: dict[str, Session],
             decode_options: DecodeOptions, options: BenchOptions, out: Path) -> _Case:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor: naive runs under no_grad, as pipelines do
        z, kwargs = vae.family.prepare(vae.model, latents, denormalize=True, settings=DecodeSettings())
    outputs = {mode: out / "videos" / f"{shape.label}-{mode}.mp4" for mode in options.modes}
    jobs: dict[str, Callable[[], Sample]] = {}
    for mode in options.modes:
        if mode == "naive":
            jobs[mode] = lambda dest=outputs[mode]: _naive_job(naive_vae, z, dest, kwargs)
        else:
            plan = plan_encode(outputs[mode], width=shape.width, height=shape.height, fps=DEFAULT_FPS,
                               options=options.encode)
            opts = dataclasses.replace(decode_options, sync=mode == "sync")
            jobs[mode] = lambda session=sessions[mode], plan=plan, opts=opts: _vaepipe_job(session, vae, z, plan,
                                                                                        opts, kwargs)
    return _Case(shape=shape, latent_shape=tuple(latents.shape), jobs=jobs, outputs=outputs)


def _naive_job(vae: LoadedVae, z: torch.Tensor, dest: Path, kwargs: dict) -> Sample:
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
            video = vae.family.decode(vae.model, z, **kwargs)
        _synchronize(vae.device)  # postprocess_video's .cpu() waits for the decode anyway; this only splits timings
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


def _vaepipe_job(session: Session, vae: LoadedVae, z: torch.Tensor, plan, options: DecodeOptions,
                 kwargs: dict) -> Sample:
    t0 = time.perf_counter()
    streamed = session.stream_sample(vae, z, plan, options, decode_kwargs=kwargs)
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(job: Callable[[], Sample], device: torch.device) -> Sample:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sample = job()
    if cuda:
        torch.cuda.synchronize(device)
        sample.peak_bytes = torch.cuda.max_memory_allocated(device)
        sample.reserved_bytes = torch.cuda.max_memory_reserved(device)
    return sample


def _time(case: _Case, options: BenchOptions, device: torch.device, reporter: Reporter) -> None:
    label = case.shape.label
    reporter.log(f"{label}: latents {list(case.latent_shape)}, warming up {', '.join(options.modes)}")
    for mode in options.modes:
        case.warmup_s[mode] = _measure(case.jobs[mode], device).wall_s
    reporter.log(f"{label} warm-up: " + " · ".join(f"{m} {s:.2f} s" for m, s in case.warmup_s.items()))
    case.samples = {mode: [] for mode in options.modes}
    for run in range(options.runs):
        for mode in options.modes:  # interleaved, so drift (clocks, heat, other load) hits every mode alike
            case.samples[mode].append(_measure(case.jobs[mode], device))
        reporter.log(f"{label} run {run + 1}/{options.runs}: "
                     + " · ".join(f"{m} {s[-1].wall_s:.2f} s" for m, s in case.samples.items()))
    if options.profile and device.type == "cuda":
        reporter.log(f"{label}: one profiled run per mode for GPU kernel utilization")
    for mode in options.modes:
        case.utilization[mode] = case.utilization_kernels[mode] = case.profiled_wall_s[mode] = None
        if options.profile and device.type == "cuda":
            try:
                (case.utilization[mode], case.utilization_kernels[mode],
                 case.profiled_wall_s[mode]) = profiled_utilization(case.jobs[mode], device)
            except RuntimeError as e:  # no CUPTI, say: report n/a rather than lose the timings
                reporter.log(f"warning: profiling {mode} failed ({str(e).splitlines()[0]}): utilization n/a")
    if any(u is not None for u in case.utilization.values()):
        reporter.log(f"{label} GPU kernel utilization (profiled run): "
                     + " · ".join(f"{m} {u:.1%}" for m, u in case.utilization.items() if u is not None))


def profiled_utilization(job: Callable[[], Sample], device: torch.device) -> tuple[float | None, float | None,
                                                                                    float]:
    """Run `job` once under the torch profiler; return the share of its wall time during which a kernel ran on
    the GPU (the union of kernel intervals over the job's window), the same share between its first and last
    kernel (how well the GPU is fed while there is GPU work), and the profiled wall time. On the CPU there are no
    kernels: 0.0."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)
    with profile(activities=activities) as prof:
        with record_function(_JOB):  # the window: a CPU-side span in the same clock as the kernels
            sample = job()
        _synchronize(device)
    fd, name = tempfile.mkstemp(prefix="vaepipe-profile-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(name)
        events = json.loads(Path(name).read_text()).get("traceEvents", [])
    finally:
        os.unlink(name)
    return kernel_utilization(events, _JOB), kernel_utilization(events, _JOB, kernels_only=True), sample.wall_s


def kernel_utilization(events: list[dict], window: str, *, kernels_only: bool = False) -> float | None:
    """From profiler trace events: the union of "kernel" intervals inside the "user_annotation" span named
    `window`, over that span's length (`kernels_only`: over first kernel start to last kernel end in it). None when
    the trace has no such span."""
    span = next((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == window), None)
    if span is None or not span.get("dur"):
        return None
    start, end = float(span["ts"]), float(span["ts"]) + float(span["dur"])
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events if e.get("cat") == "kernel"]
    if kernels_only:
        inside = [(a, b) for a, b in kernels if b > start and a < end]
        if not inside:
            return None
        start, end = max(start, min(a for a, _ in inside)), min(end, max(b for _, b in inside))
    return busy_fraction(kernels, start, end)


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The share of [start, end] covered by the union of `intervals` (overlaps counted once)."""
    covered, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            covered += b - a
            reach = b
    return covered / (end - start) if end > start else 0.0


def _result(case: _Case, vae: LoadedVae, options: BenchOptions) -> dict:
    frames = vae.family.num_frames(vae.model, case.latent_shape[2])
    modes: dict[str, dict] = {}
    for mode, samples in case.samples.items():
        walls = [s.wall_s for s in samples]
        wall = statistics.median(walls)
        decode = statistics.median(s.stages_s["decode"] for s in samples)
        peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
        reserved = [s.reserved_bytes for s in samples if s.reserved_bytes is not None]
        output = case.outputs[mode]
        modes[mode] = {
            "wall_s": {"median": round(wall, 4), "min": round(min(walls), 4), "max": round(max(walls), 4),
                       "stdev": round(statistics.stdev(walls), 4) if len(walls) > 1 else 0.0,
                       "runs": [round(w, 4) for w in walls]},
            "warmup_s": round(case.warmup_s[mode], 4),
            "decode_busy_s": round(decode, 4),
            "wall_over_decode": round(wall / decode, 4) if decode else None,
            "stages_s": {k: round(statistics.median(s.stages_s[k] for s in samples), 4) for k in samples[0].stages_s},
            "kernel_utilization": _round(case.utilization.get(mode)),
            "kernel_utilization_while_gpu_work": _round(case.utilization_kernels.get(mode)),
            "profiled_wall_s": _round(case.profiled_wall_s.get(mode)),
            "peak_vram_gib": round(max(peaks) / 2**30, 3) if peaks else None,
            "peak_reserved_gib": round(max(reserved) / 2**30, 3) if reserved else None,
            "fps": round(frames / wall, 2),
            "output": str(output), "bytes": output.stat().st_size, "sha256": output_sha256(output),
            "encoder": NAIVE_ENCODER if mode == "naive" else _vaepipe_encoder(options),
        }
    for row in modes.values():
        for base in ("naive", "sync"):
            other = modes.get(base)
            row[f"speedup_vs_{base}"] = (round(other["wall_s"]["median"] / row["wall_s"]["median"], 3)
                                         if other else None)
    if "sync" in modes and "pipelined" in modes:
        modes["pipelined"]["same_file_as_sync"] = modes["pipelined"]["sha256"] == modes["sync"]["sha256"]
    return {"shape": case.shape.label, "height": case.shape.height, "width": case.shape.width, "frames": frames,
            "latents": list(case.latent_shape), "modes": modes, "targets": targets(modes)}


def _vaepipe_encoder(options: BenchOptions) -> str:
    return f"vaepipe Encoder: libx264 CRF {options.crf} {options.preset} yuv420p (BT.709), bit-exact mux"


def targets(modes: dict[str, dict]) -> dict | None:
    """The issue's targets for `pipelined`: each with its value, the bound and whether it is met (None: n/a)."""
    p = modes.get("pipelined")
    if p is None:
        return None
    ratio, util = p["wall_over_decode"], p["kernel_utilization"]
    checks = {
        "wall_over_decode": {"value": ratio, "bound": f"<= {TARGETS['wall_over_decode']}",
                             "met": ratio is not None and ratio <= TARGETS["wall_over_decode"]},
        "kernel_utilization": {"value": util, "bound": f">= {TARGETS['kernel_utilization']}",
                               "met": None if util is None else util >= TARGETS["kernel_utilization"]},
    }
    if "sync" in modes:
        checks["speedup_vs_sync"] = {"value": p["speedup_vs_sync"], "bound": "> 1",
                                     "met": p["speedup_vs_sync"] > 1}
    if "naive" in modes:
        # As fast as the decode alone would allow: naive wall / decode-lane busy.
        need = round(modes["naive"]["wall_s"]["median"] / p["decode_busy_s"], 3)
        checks["speedup_vs_naive"] = {"value": p["speedup_vs_naive"], "bound": f">= {need} (naive wall /"
                                      " pipelined decode-lane busy)", "met": p["speedup_vs_naive"] >= need}
    return checks


def memory_check(results: list[dict]) -> list[dict]:
    """Peak VRAM of `pipelined` for each longer clip against the shortest clip of the same height and width:
    streaming keeps memory flat in the clip length."""
    checks = []
    by_size: dict[tuple[int, int], list[dict]] = {}
    for r in results:
        if "pipelined" in r["modes"] and r["modes"]["pipelined"]["peak_vram_gib"] is not None:
            by_size.setdefault((r["height"], r["width"]), []).append(r)
    for group in by_size.values():
        group.sort(key=lambda r: r["frames"])
        base = group[0]["modes"]["pipelined"]["peak_vram_gib"]
        for r in group[1:]:
            peak = r["modes"]["pipelined"]["peak_vram_gib"]
            checks.append({"shape": r["shape"], "against": group[0]["shape"], "peak_vram_gib": peak,
                           "base_peak_vram_gib": base, "ratio": round(peak / base, 4),
                           "met": peak / base <= TARGETS["memory_growth"]})
    return checks


def environment(device: torch.device) -> dict:
    import diffusers

    facts = {"device": "CPU", "driver": None, "cuda": torch.version.cuda, "torch": torch.__version__,
             "diffusers": diffusers.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(), "ffmpeg": _ffmpeg_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                  "driver": _nvidia_driver()}
    return facts


def _nvidia_driver() -> str | None:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = run.stdout.strip().splitlines()
    return lines[0].strip() if run.returncode == 0 and lines else None


def _ffmpeg_version() -> str | None:
    try:
        run = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = run.stdout.splitlines()[0] if run.stdout else ""
    return first.removeprefix("ffmpeg version ").split(" ")[0] or None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def chrome_trace(spans: list[tuple[str, str, float, float]], lanes: tuple[str, ...], *, title: str) -> dict:
    """Chrome trace events (JSON object format) for chrome://tracing and Perfetto: one process, one track (tid) per
    lane, one complete ("X") event per span (chunk); times in microseconds."""
    pid = 1
    tids = {lane: i + 1 for i, lane in enumerate(lanes)}
    events: list[dict] = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": title}}]
    for lane, tid in tids.items():
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    for lane, what, start, end in sorted(spans, key=lambda s: (tids[s[0]], s[2])):
        events.append({"ph": "X", "name": f"{lane} {what}", "cat": lane, "pid": pid, "tid": tids[lane],
                       "ts": round(start * 1e6, 3), "dur": round((end - start) * 1e6, 3)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def plot_timeline(samples: dict[str, Sample], path: Path, *, title: str) -> None:
    """A PNG with one panel per mode and one row per lane, a bar per chunk, on a shared time axis."""
    from matplotlib.figure import Figure  # optional extra: imported only here

    colors = {"decode": "#4C72B0", "copy": "#55A868", "encode": "#C44E52", "postprocess": "#55A868",
              "export": "#C44E52"}
    fig = Figure(figsize=(11, 1.3 + 1.2 * len(samples)), layout="constrained")
    axes = fig.subplots(len(samples), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (mode, sample) in zip(axes, samples.items(), strict=True):
        lanes = NAIVE_STAGES if mode == "naive" else LANES
        for row, lane in enumerate(lanes):
            bars = [(start, end - start) for name, _, start, end in sample.spans if name == lane]
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colors[lane], edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_ylim(len(lanes) - 0.5, -0.5)
        ax.set_title(f"{mode}: {sample.wall_s:.2f} s", loc="left", fontsize=10)
        ax.axvline(sample.wall_s, color="black", linewidth=0.8, linestyle=":")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds since the job started (latents in device memory); dotted: video closed")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    """bench.md: the environment, the exact command, a table per shape and the target checks."""
    env, settings = report["environment"], report["settings"]
    lines = [f"# vaepipe bench: {env['device']}", "",
             f"- date: {report['date']}",
             f"- device: {env['device']}" + (f", driver {env['driver']}" if env["driver"] else "")
             + (f", CUDA {env['cuda']}" if env["cuda"] and env["device"] != "CPU" else ""),
             f"- torch {env['torch']}, diffusers {env['diffusers']}, vaepipe {report['vaepipe']}, Python"
             f" {env['python']}, ffmpeg {env['ffmpeg']}, {env['cpu_cores']} CPU cores",
             f"- VAE {settings['vae']}, {settings['dtype']}; latents {settings['latents']}",
             f"- sync and pipelined encode with {settings['encoder']}; naive with {settings['naive_encoder']}",
             f"- {settings['runs']} timed runs per mode after one warm-up, modes interleaved in each run; model load"
             f" {report['load_s']:.2f} s (not timed)",
             "- wall = latents in device memory → video closed on disk; GPU kernel utilization (CUDA only) from one"
             " extra run per mode under the torch profiler; peak VRAM = torch.cuda.max_memory_allocated",
             "- wall ÷ decode: wall time over the decode lane's busy time (naive: over its vae.decode)",
             "", "```", report["command"], "```", ""]
    for r in report["results"]:
        lines += [f"## {r['shape']} ({r['frames']} frames from latents {r['latents']})", "",
                  "| mode | wall s, median [min–max] | decode-lane busy s | wall ÷ decode | GPU kernel util |"
                  " peak VRAM GiB | fps | × vs naive | × vs sync | warm-up s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for mode, m in r["modes"].items():
            w = m["wall_s"]
            lines.append(f"| {mode} | {w['median']:.3f} [{w['min']:.3f}–{w['max']:.3f}] | {m['decode_busy_s']:.3f}"
                         f" | {_fmt(m['wall_over_decode'], '.3f')} | {_fmt(m['kernel_utilization'], '.1%')}"
                         f" | {_fmt(m['peak_vram_gib'], '.2f')} | {m['fps']:.1f} | {_fmt(m['speedup_vs_naive'], '.2f')}"
                         f" | {_fmt(m['speedup_vs_sync'], '.2f')} | {m['warmup_s']:.2f} |")
        lines.append("")
        stages = "; ".join(f"{mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in m["stages_s"].items())
                           for mode, m in r["modes"].items())
        lines += [f"Per-lane busy seconds (median): {stages}.", ""]
        fed = "; ".join(f"{mode} {_fmt(m.get('kernel_utilization_while_gpu_work'), '.1%')}"
                        for mode, m in r["modes"].items())
        lines += [f"GPU kernel utilization from the first kernel to the last (how well the GPU is fed while it has"
                  f" work, leaving out the encoder's drain after it): {fed}.", ""]
        if "same_file_as_sync" in r["modes"].get("pipelined", {}):
            same = r["modes"]["pipelined"]["same_file_as_sync"]
            lines += [f"sync and pipelined files are {'byte-identical' if same else 'DIFFERENT'}.", ""]
        if r["targets"]:
            lines += ["| target (pipelined) | value | bound | met |", "|---|---|---|---|"]
            for name, t in r["targets"].items():
                met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
                lines.append(f"| {name} | {_fmt(t['value'], '.3f')} | {t['bound']} | {met} |")
            lines.append("")
        if r.get("timeline"):
            lines += [f"![timeline {r['shape']}]({r['timeline']})", ""]
    if report["memory"]:
        lines += ["## Memory (pipelined peak VRAM against the shortest clip of the same size)", "",
                  "| shape | peak GiB | against | peak GiB | ratio | within 5 % |", "|---|---|---|---|---|---|"]
        for c in report["memory"]:
            lines.append(f"| {c['shape']} | {c['peak_vram_gib']:.3f} | {c['against']} | {c['base_peak_vram_gib']:.3f}"
                         f" | {c['ratio']:.3f} | {'yes' if c['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def print_table(report: dict, reporter: Reporter) -> None:
    """The results on the reporter's console: one Rich table per shape, narrow enough for 80 columns."""
    from rich import box
    from rich.table import Table

    if reporter.quiet:
        return
    env, dtype = report["environment"], report["settings"]["dtype"]
    for r in report["results"]:
        table = Table(title=f"{r['shape']}, {dtype}, {env['device']} (wall: median ± half range; util: GPU"
                      " kernels)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for name in ("mode", "wall s", "±", "dec s", "w/dec", "util", "VRAM GiB", "fps", "×naive", "×sync"):
            table.add_column(name, justify="left" if name == "mode" else "right", no_wrap=True)
        for mode, m in r["modes"].items():
            w = m["wall_s"]
            table.add_row(mode, f"{w['median']:.3f}", f"±{(w['max'] - w['min']) / 2:.3f}", f"{m['decode_busy_s']:.3f}",
                          _fmt(m["wall_over_decode"], ".3f"), _fmt(m["kernel_utilization"], ".1%"),
                          _fmt(m["peak_vram_gib"], ".2f"), f"{m['fps']:.1f}", _fmt(m["speedup_vs_naive"], ".2f"),
                          _fmt(m["speedup_vs_sync"], ".2f"))
        reporter.console.print(table)
        missed = [f"{k} {_fmt(t['value'], '.3f')} (bound {t['bound']})" for k, t in (r["targets"] or {}).items()
                  if t["met"] is False]
        if missed:
            reporter.log(f"{r['shape']} pipelined misses: {'; '.join(missed)}")
    for c in report["memory"]:
        reporter.log(f"memory: {c['shape']} peak {c['peak_vram_gib']:.3f} GiB = {c['ratio']:.3f} × {c['against']}")
