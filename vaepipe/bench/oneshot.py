"""One-shot: the whole `vaepipe decode` command from a fresh process, as most people call a CLI (one clip per
command): its wall time from the parent's side, median of N, and the start-up parts the child reports."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import VaepipeError

PARTS = ("imports_s", "vae_load_s", "first_call_extra_s", "total_s")


def time_one_shot(args: list[str], runs: int, *, env: dict | None = None) -> dict:
    """Run `python -m vaepipe decode ARGS --json -q` `runs` times, each in a fresh process; return the wall times
    (median, min, max, each run) and the median of each start-up part the runs reported (and each run's)."""
    root = str(Path(__file__).resolve().parents[2])  # the vaepipe this process runs, also where it is not installed
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "vaepipe", "decode", *args, "--json", "-q"]
    walls, startups = [], []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - t)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise VaepipeError(f"one-shot decode failed (exit {proc.returncode}): {last}")
        startups.append(json.loads(proc.stdout)["startup"])
    parts = {}
    for part in PARTS:
        values = [s[part] for s in startups if s.get(part) is not None]
        parts[part] = round(statistics.median(values), 3) if values else None
    return {"command": "vaepipe decode " + " ".join(args), "runs": runs,
            "wall_s": {"median": round(statistics.median(walls), 3), "min": round(min(walls), 3),
                       "max": round(max(walls), 3), "each": [round(w, 3) for w in walls]},
            "startup": parts, "startup_each": startups}
