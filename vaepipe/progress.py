"""Progress and summaries: Rich rows on stderr (one per lane), machine-readable JSON on stdout."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .pipeline import LANES


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "fps")
        rated = task.fields.get("rated", task.completed)  # the batch row: jobs that ran, not skipped ones
        if not task.elapsed or not rated:
            return Text(f"– {unit}", style="progress.data.speed")
        return Text(f"{rated / task.elapsed:.1f} {unit}", style="progress.data.speed")


PLAIN_INTERVAL_S = 5.0
"""Where stderr is not a terminal (a log file, CI, Slurm): a plain progress line this often, and one at the end."""


class Reporter:
    """Everything vaepipe tells the user. `quiet`: errors only; `as_json`: the summary goes to stdout as JSON.

    On a terminal the rows are Rich bars, redrawn in place. Elsewhere bars would stay silent until the end (Rich
    draws a live display only on a terminal), so the rows are kept but not drawn, and `tick` prints them as one
    plain line every `interval` seconds of `clock` and once when they are complete."""

    def __init__(self, *, quiet: bool = False, as_json: bool = False, console: Console | None = None,
                 interval: float = PLAIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.quiet, self.as_json = quiet, as_json
        self.console = console or Console(stderr=True, quiet=quiet)
        self.plain = not quiet and not self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 _RateColumn(), TimeElapsedColumn(), console=self.console, transient=False,
                                 disable=quiet or self.plain, get_time=clock)
        self._rows: _LaneRows | None = None
        self._interval, self._clock = interval, clock
        self._lock = threading.Lock()
        self._last_at: float | None = None
        self._last_counts: list = []

    def __enter__(self) -> Reporter:
        self._last_at = self._clock()
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.tick(force=True)  # where it stopped, if that was not said yet
        self.progress.stop()

    def tick(self, *, force: bool = False) -> None:
        """Plain mode: print the rows as one line if `interval` has passed since the last one (or `force`)."""
        if not self.plain:
            return
        with self._lock:
            now = self._clock()
            if self._last_at is None:
                self._last_at = now  # rows used outside `with`: the first line after one interval
            if not force and now - self._last_at < self._interval:
                return
            counts = [(t.description, t.completed, t.total) for t in self.progress.tasks if t.total is not None]
            if not counts or counts == self._last_counts:  # nothing moved since the last line
                return
            self._last_at, self._last_counts = now, counts
            line = self._plain_line()
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def _plain_line(self) -> str:
        parts = []
        for task in self.progress.tasks:
            if task.total is None:
                continue
            part = f"{task.description} {task.completed:g}/{task.total:g}"
            rated = task.fields.get("rated", task.completed)
            if task.elapsed and rated:
                part += f" {rated / task.elapsed:.1f} {task.fields.get('unit', 'fps')}"
            if task.fields.get("detail"):
                part += f" ({task.fields['detail']})"
            parts.append(part)
        elapsed = max((t.elapsed or 0.0 for t in self.progress.tasks), default=0.0)
        return f"progress [{timedelta(seconds=round(elapsed))}] " + " · ".join(parts)

    def log(self, message: str, *, markup: bool = False) -> None:
        """A line above the bars (bars stay intact). `markup`: the message is Rich markup (escape what it quotes)."""
        if not self.quiet:
            self.progress.console.print(message, highlight=False, markup=markup)

    def lanes(self, total_frames: int) -> _LaneRows:
        """The lane rows, reset for a new output (created on first use, then reused so rows stay in place)."""
        if self._rows is None:
            self._rows = _LaneRows(self)
        self._rows.reset(total_frames)
        return self._rows

    def summary(self, summary: dict) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
            sys.stdout.flush()
        if self.quiet:
            return
        for out in summary.get("outputs", []):
            table = Table(title=f"{out['output']}  ({_size(out['bytes'])})", title_justify="left", show_edge=False)
            table.add_column("lane")
            table.add_column("busy s", justify="right")
            table.add_column("share of wall", justify="right")
            for lane in LANES:
                busy = out["busy_s"][lane]
                table.add_row(lane, f"{busy:.3f}", f"{busy / out['wall_s']:.0%}" if out["wall_s"] else "–")
            self.progress.console.print(table)
            self.progress.console.print(
                f"{out['frames']} frames {out['width']}x{out['height']} in {out['wall_s']:.3f} s wall "
                f"({out['frames'] / out['wall_s']:.1f} fps), decode-lane utilization "
                f"{out['decode_utilization']:.1%}; encoder drain after the last frame {out['encoder_drain_s']:.3f} s",
                highlight=False)
            bands, peak = out.get("band_plan"), out.get("peak_gib")
            if bands or peak is not None:
                where = (f"in {bands['bands']} bands of {min(bands['rows'])}-{max(bands['rows'])} rows, "
                         f"{bands['chunk']} latent frames per call, caches on the {bands['caches']} ({bands['why']})"
                         if bands else "whole frames")
                self.progress.console.print(f"decoded {where}" + (f"; peak GPU memory {peak:.2f} GiB"
                                                                  if peak is not None else ""), highlight=False)
            if out.get("replaced"):
                self.progress.console.print(f"replaced the file that was at {out['output']}", highlight=False,
                                            markup=False)
        if parts := summary.get("startup"):
            extra = parts["first_call_extra_s"]
            self.progress.console.print(
                f"start-up: imports {parts['imports_s']:.2f} s, VAE load {parts['vae_load_s']:.2f} s, first-call extra"
                f" {'–' if extra is None else f'{extra:.2f} s'}; {parts['total_s']:.2f} s since the command started",
                highlight=False)


class _LaneRows:
    def __init__(self, reporter: Reporter):
        self.reporter, self.progress = reporter, reporter.progress
        self.tasks = {lane: self.progress.add_task(lane, total=None) for lane in LANES}

    def reset(self, total: int) -> None:
        for task in self.tasks.values():
            self.progress.reset(task, total=total)

    def advance(self, lane: str, frames: int) -> None:
        self.progress.advance(self.tasks[lane], frames)
        self.reporter.tick(force=self.progress.finished)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
