"""Measurement: one job timed (wall, peak memory), the warm-up and interleaved runs of a shape, and GPU kernel
utilization from one extra profiled run."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..progress import Reporter

if TYPE_CHECKING:
    from .options import BenchOptions, Shape

_JOB = "vaepipe.bench.job"  # the profiler annotation around one job: the window kernel utilization is taken over


@dataclass(kw_only=True, slots=True)
class Sample:
    """One timed job."""

    wall_s: float
    stages_s: dict[str, float]
    spans: list[tuple[str, str, float, float]]
    """(lane, what, start, end): one span per chunk and lane ("chunk 3"), seconds since the job started."""
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    encoders: int = 1
    """Concurrent encoders the job's output was encoded with (segments)."""


@dataclass(kw_only=True, slots=True)
class Case:
    """One table: a shape, what the encoder is given and the --encoders value; one job function per mode."""

    shape: Shape
    content: str
    encoders: int | str
    latent_shape: tuple[int, ...]
    jobs: dict[str, Callable[[], Sample]]
    outputs: dict[str, Path]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    warmup_s: dict[str, float] = field(default_factory=dict)
    utilization: dict[str, float | None] = field(default_factory=dict)
    utilization_kernels: dict[str, float | None] = field(default_factory=dict)
    profiled_wall_s: dict[str, float | None] = field(default_factory=dict)
    references: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Per mode, the frames its encoder got (recorded in the warm-up): what its video's PSNR is measured against."""

    @property
    def label(self) -> str:
        return f"{self.shape.label} {self.content} e{self.encoders}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(call: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of call(), the device's work included."""
    synchronize(device)
    t = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - t


def measure(job: Callable[[], Sample], device: torch.device) -> Sample:
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


def time_cases(cases: list[Case], options: BenchOptions, device: torch.device, reporter: Reporter) -> None:
    """Warm up every case's modes, then the timed runs with every (case, mode) interleaved in each run, then (CUDA)
    one profiled run per case and mode."""
    for case in cases:
        reporter.log(f"{case.label}: latents {list(case.latent_shape)}, warming up {', '.join(options.modes)}")
        for mode in options.modes:
            case.warmup_s[mode] = measure(case.jobs[mode], device).wall_s
        reporter.log(f"{case.label} warm-up: " + " · ".join(f"{m} {s:.2f} s" for m, s in case.warmup_s.items()))
        case.samples = {mode: [] for mode in options.modes}
    for run in range(options.runs):
        for case in cases:  # interleaved, so drift (clocks, heat, other load) hits every mode and case alike
            for mode in options.modes:
                case.samples[mode].append(measure(case.jobs[mode], device))
            reporter.log(f"{case.label} run {run + 1}/{options.runs}: "
                         + " · ".join(f"{m} {s[-1].wall_s:.2f} s" for m, s in case.samples.items()))
    for case in cases:
        _profile(case, options, device, reporter)


def _profile(case: Case, options: BenchOptions, device: torch.device, reporter: Reporter) -> None:
    label = case.label
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
    synchronize(device)
    with profile(activities=activities) as prof:
        with record_function(_JOB):  # the window: a CPU-side span in the same clock as the kernels
            sample = job()
        synchronize(device)
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


