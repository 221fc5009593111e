"""Progress and summaries: Rich rows on stderr (one per lane), machine-readable JSON on stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .pipeline import LANES


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "fps")
        if not task.elapsed or not task.completed:
            return Text(f"– {unit}", style="progress.data.speed")
        return Text(f"{task.completed / task.elapsed:.1f} {unit}", style="progress.data.speed")


class Reporter:
    """Everything vaepipe tells the user. `quiet`: errors only; `as_json`: the summary goes to stdout as JSON."""

    def __init__(self, *, quiet: bool = False, as_json: bool = False, console: Console | None = None):
        self.quiet, self.as_json = quiet, as_json
        self.console = console or Console(stderr=True, quiet=quiet)
        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 _RateColumn(), TimeElapsedColumn(), console=self.console, transient=False,
                                 disable=quiet)
        self._rows: _LaneRows | None = None

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def log(self, message: str, *, markup: bool = False) -> None:
        """A line above the bars (bars stay intact). `markup`: the message is Rich markup (escape what it quotes)."""
        if not self.quiet:
            self.progress.console.print(message, highlight=False, markup=markup)

    def lanes(self, total_frames: int) -> _LaneRows:
        """The lane rows, reset for a new output (created on first use, then reused so rows stay in place)."""
        if self._rows is None:
            self._rows = _LaneRows(self.progress)
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
        if parts := summary.get("startup"):
            extra = parts["first_call_extra_s"]
            self.progress.console.print(
                f"start-up: imports {parts['imports_s']:.2f} s, VAE load {parts['vae_load_s']:.2f} s, first-call extra"
                f" {'–' if extra is None else f'{extra:.2f} s'}; {parts['total_s']:.2f} s since the command started",
                highlight=False)


class _LaneRows:
    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks = {lane: progress.add_task(lane, total=None) for lane in LANES}

    def reset(self, total: int) -> None:
        for task in self.tasks.values():
            self.progress.reset(task, total=total)

    def advance(self, lane: str, frames: int) -> None:
        self.progress.advance(self.tasks[lane], frames)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
