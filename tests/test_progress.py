"""Progress where stderr is not a terminal (a log file, CI, Slurm): plain lines at a steady interval and at the end,
never silence until the end; on a terminal, Rich's bars as before."""

import io
import re

from rich.console import Console
from typer.testing import CliRunner

from vaepipe.cli import app
from vaepipe.progress import Reporter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain_reporter(clock: Clock, interval: float = 5.0) -> tuple[Reporter, io.StringIO]:
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    return Reporter(console=console, interval=interval, clock=clock), log


def lines(log: io.StringIO) -> list[str]:
    return [line for line in log.getvalue().splitlines() if line.startswith("progress")]


def test_lane_progress_is_a_plain_line_every_interval_and_at_the_end():
    clock = Clock()
    reporter, log = plain_reporter(clock)
    with reporter:
        rows = reporter.lanes(17)
        clock.now += 1.0
        rows.advance("decode", 1)
        clock.now += 3.9  # 4.9 s since the start: not yet
        rows.advance("decode", 4)
        rows.advance("copy", 1)
        assert lines(log) == []
        clock.now += 0.1  # 5 s
        rows.advance("encode", 1)
        assert lines(log) == ["progress [0:00:05] decode 5/17 1.0 fps · copy 1/17 0.2 fps · encode 1/17 0.2 fps"]
        clock.now += 4.0  # 4 s after that line: not yet, however much moves
        rows.advance("decode", 8)
        assert len(lines(log)) == 1
        clock.now += 1.0
        rows.advance("copy", 4)
        assert len(lines(log)) == 2 and "decode 13/17" in lines(log)[1] and "[0:00:10]" in lines(log)[1]
        clock.now += 0.5  # the end, between two intervals: said at once
        rows.advance("decode", 4)
        rows.advance("copy", 12)
        rows.advance("encode", 16)
        assert lines(log)[-1].endswith("decode 17/17 1.6 fps · copy 17/17 1.6 fps · encode 17/17 1.6 fps")
    assert len(lines(log)) == 3  # leaving adds nothing already said


def test_batch_row_counts_and_detail_are_in_the_plain_line():
    clock = Clock()
    reporter, log = plain_reporter(clock, interval=2.0)
    with reporter:
        row = reporter.progress.add_task("batch", total=4, unit="jobs/s", detail="1 done · 0 failed · 0 skipped")
        reporter.progress.update(row, completed=1)
        clock.now += 2.0
        reporter.tick()
    assert lines(log) == ["progress [0:00:02] batch 1/4 0.5 jobs/s (1 done · 0 failed · 0 skipped)"]


def test_a_stop_midway_says_where_it_stopped():
    clock = Clock()
    reporter, log = plain_reporter(clock)
    try:
        with reporter:
            reporter.lanes(9).advance("decode", 5)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert lines(log) == ["progress [0:00:00] decode 5/9 · copy 0/9 · encode 0/9"]


def test_on_a_terminal_the_bars_are_rich_and_no_plain_lines_are_printed():
    clock = Clock()
    log = io.StringIO()
    reporter = Reporter(console=Console(file=log, force_terminal=True, width=120), clock=clock)
    with reporter:
        rows = reporter.lanes(5)
        for lane in ("decode", "copy", "encode"):
            clock.now += 10
            rows.advance(lane, 5)
    assert not reporter.plain and "progress [" not in log.getvalue() and "5/5" in log.getvalue()


def test_decode_into_a_log_prints_plain_progress(tmp_path, latents_file):
    result = CliRunner().invoke(app, ["decode", str(latents_file), str(tmp_path / "o.mp4"), "--vae",
                                      "random:wan2.1-tiny", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "progress [" in result.stderr and "encode 9/9" in result.stderr
    assert not re.search(r"(decode|copy|encode) +━", result.stderr)  # no bars drawn into a file
