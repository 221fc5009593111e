"""Benchmark: what a diffusers user does today (`naive`) against vaepipe's chunks on one stream (`sync`) and its
three overlapped lanes (`pipelined`), on the same denormalised latents, in one process.

    per shape:  load latents -> warm-up (each mode once) -> N runs, modes interleaved in each run
                -> one extra profiled run per mode (GPU kernel utilization; the timed runs stay unprofiled)

Wall time is "latents in memory -> video closed on disk". Results go to the terminal (a Rich table), bench.json
and bench.md; `--trace` writes one Chrome/Perfetto trace per shape and mode, `--plot` a PNG timeline per shape.

    options.py   BenchOptions (what to time) and Shape
    modes.py     the modes: MODES and the job each one runs (naive, sync, pipelined)
    measure.py   timing a job, the warm-up and interleaved runs, GPU kernel utilization
    report.py    results per mode, targets, memory check, bench.md and the terminal table
    plot.py      Chrome/Perfetto traces and the PNG timeline
    run.py       run_bench: the whole run
"""

from .measure import Sample, busy_fraction, kernel_utilization, profiled_utilization
from .modes import MODES
from .options import BenchOptions, Shape
from .plot import chrome_trace, plot_timeline
from .report import markdown, memory_check, print_table
from .run import run_bench

__all__ = ["MODES", "BenchOptions", "Sample", "Shape", "busy_fraction", "chrome_trace", "kernel_utilization",
           "markdown", "memory_check", "plot_timeline", "print_table", "profiled_utilization", "run_bench"]
