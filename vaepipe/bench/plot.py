"""Pictures of a run: a Chrome/Perfetto trace per mode and a PNG timeline per shape."""

from __future__ import annotations

from pathlib import Path

from ..pipeline import LANES
from .measure import Sample
from .modes import NAIVE_STAGES


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
