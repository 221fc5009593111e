"""Files vaepipe reads must be regular files: a FIFO blocks the read forever, a device (/dev/zero) never ends, a
folder is not what was meant; each is refused at once, in its own words."""

from __future__ import annotations

import pickle
import re
import stat
from pathlib import Path

from .errors import BadInput

SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".latent")
"""Latents files vaepipe reads (latents.py), by their extension."""


def not_regular(path: Path) -> str | None:
    """Why `path` (followed through links) is not a regular file to read, such as "does not exist" or "is a FIFO
    (named pipe), not a regular file"; None when it is one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "something other than a file")
    return f"is {kind}, not a regular file"


def refused_pickle(path: Path, error: pickle.UnpicklingError, fix: str) -> BadInput:
    """One sentence for a file that torch's restricted unpickler refused, naming the object it holds (torch's own
    message is long, coloured, and advises `weights_only=False`, which would run that code)."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    named = f" ({found.group(1).rstrip('.')})" if found else ""
    return BadInput(f"refused to load {str(path)!r}: it holds Python objects other than tensors{named}, and loading"
                    f" them could run code; {fix}")


def regular_file(path: str | Path, what: str, fix: str) -> Path:
    """`path` as a Path if it is a regular file; else BadInput: `what` `path` is …: `fix`."""
    path = Path(path)
    why = not_regular(path)
    if why:
        raise BadInput(f"{what} {str(path)!r} {why}" + ("" if why == "does not exist" else f": {fix}"))
    return path
