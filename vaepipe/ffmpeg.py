"""The floor under encode.py and mux.py: which ffmpeg runs, and what its exit status says."""

from __future__ import annotations

import resource
import signal

from .errors import BadInput


def ffmpeg_exe() -> str:
    """The ffmpeg that imageio-ffmpeg resolves (IMAGEIO_FFMPEG_EXE first, then its bundled binary)."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise BadInput(f"no ffmpeg found ({e}): pip install imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE") from None


def file_size_limit(returncode: int | None, dest) -> BadInput | None:
    """The error for an ffmpeg killed by SIGXFSZ (the shell's `ulimit -f` reached), else None. Bad input, not a
    failure: the limit is the user's to raise, and nothing is left behind."""
    if returncode != -signal.SIGXFSZ:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit = "" if soft == resource.RLIM_INFINITY else f" ({soft / 2**20:.3g} MiB)"
    return BadInput(f"the file-size limit{limit} was reached while writing {dest}: raise it (ulimit -f unlimited)"
                    " or write a smaller output (a higher --crf, fewer frames)")
