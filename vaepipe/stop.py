"""Stopping on Ctrl-C or SIGTERM: exit code 130 and one line, never a traceback, never death by signal — during
start-up (importing torch takes seconds) and on a second Ctrl-C while vaepipe is already stopping, too."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

MESSAGE = "interrupted: no partial output was left behind"


def terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean-up path as Ctrl-C


def exit_now_on_next() -> None:
    """Once the clean-up is done and vaepipe is exiting with 130, another Ctrl-C or SIGTERM ends it at once with
    130 (the interpreter's own exit, joining threads, would otherwise print a traceback or die by the signal)."""

    def now(signum, frame) -> None:
        os._exit(130)

    signal.signal(signal.SIGINT, now)
    signal.signal(signal.SIGTERM, now)


def exit_interrupted(*, told: bool = False) -> None:
    """Exit with 130 after saying so (unless `told`). Called once the clean-up is done (no ffmpeg, no partial file),
    so the interpreter's own exit is skipped: after a Ctrl-C that landed in code run by `exec` or `eval` (dataclasses,
    typing, diffusers' lazy imports) it would end the process by SIGINT instead of with the code asked for."""
    exit_now_on_next()
    if not told:
        sys.stderr.write(MESSAGE + "\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(130)
