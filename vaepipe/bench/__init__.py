"""Benchmark: what a diffusers user does today (`naive`, and with fastvae's decoder `fastvae`) against vaepipe's chunks
on one stream (`sync`), its three overlapped lanes (`pipelined`, the engine on GPUs) and `exact`, on the same
denormalised latents, in one process; then each decoder's decode lane alone (decoders.py).

    per shape:  load latents -> warm-up (each mode once) -> N runs, modes interleaved in each run
                -> one extra profiled run per mode (GPU kernel utilization; the timed runs stay unprofiled)

Wall time is "latents in memory -> video closed on disk". Results go to the terminal (a Rich table), bench.json
and bench.md; `--trace` writes one Chrome/Perfetto trace per shape and mode, `--plot` a PNG timeline per shape.

    options.py   BenchOptions (what to time), Shape and the mode names (MODES)
    modes.py     the job each mode runs (naive, fastvae, sync, pipelined, exact, decode, encode)
    decoders.py  the decode lane alone, decoder against decoder: speed, first call, memory, exactness, fidelity
    measure.py   timing a job, the warm-up and interleaved runs, GPU kernel utilization
    report.py    results per mode, targets, memory check, bench.md and the terminal table
    plot.py      Chrome/Perfetto traces and the PNG timeline
    run.py       run_bench: the whole run
"""

from .measure import Sample, busy_fraction, kernel_utilization, profiled_utilization
from .options import MODES, BenchOptions, Shape, bench_defaults, default_modes
from .plot import chrome_trace, plot_timeline
from .report import markdown, memory_check, print_table
from .run import run_bench

__all__ = ["MODES", "BenchOptions", "Sample", "Shape", "bench_defaults", "busy_fraction", "chrome_trace",
           "default_modes", "kernel_utilization", "markdown", "memory_check", "plot_timeline", "print_table",
           "profiled_utilization", "run_bench"]
