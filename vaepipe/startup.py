"""Start-up: what a command costs before and around its decode, in parts (imports, VAE load, the first call's extra
over a steady one), and the line that says vaepipe is loading while the imports run.

Light on purpose: the command line imports it before torch."""

from __future__ import annotations

import sys
import time

_imports_done: float | None = None


def process_s() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since vaepipe was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        import os

        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def loading(quiet: bool) -> None:
    """Say at once, on stderr, that vaepipe is loading (importing torch and diffusers takes seconds: on a 2-core
    machine the first line came ~20 s after the command started). Not with --quiet; --json keeps stdout clean."""
    if not quiet:
        sys.stderr.write("loading PyTorch and diffusers…\n")
        sys.stderr.flush()
