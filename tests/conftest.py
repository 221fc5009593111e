"""Shared helpers: tiny random VAEs, latents files, and ffmpeg decoding a video back to RGB frames."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from vaepipe.encode import ffmpeg_exe
from vaepipe.vae import load_vae


def start_vaepipe(*args: str, **popen) -> subprocess.Popen:
    """`python -m vaepipe ARGS` as a shell in a terminal starts it, with Ctrl-C's default handling: also where the
    tests themselves run with SIGINT ignored (a background job without job control does, and a child keeps that)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "vaepipe", *args], env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def tiny_vae(preset: str = "random:wan2.1-tiny", dtype=torch.float32, device="cpu"):
    return load_vae(preset, dtype=dtype, device=torch.device(device)).model


def write_latents(path: Path, shape, *, seed: int = 0, fps: float | None = None, dtype=torch.float32) -> torch.Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    torch.save({"latents": z, "fps": fps} if fps else z, path)
    return z


def diffusers_frames(vae, z: torch.Tensor) -> np.ndarray:
    """What a diffusers Wan pipeline gives for normalised latents `z` [1, C, T, H, W]: its own denormalisation,
    `vae.decode`, then `VideoProcessor.postprocess_video(..., output_type="pil")` -> [F, H, W, 3] uint8."""
    from diffusers.video_processor import VideoProcessor

    z = z.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    with torch.no_grad():
        video = vae.decode(z / std + mean, return_dict=False)[0]
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pil")[0]
    return np.stack([np.asarray(f) for f in frames])


def read_video(path: Path) -> np.ndarray:
    """Decode a video (or PNG pattern) back to RGB frames [F, H, W, 3] with ffmpeg itself."""
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    line = next(line for line in probe.stderr.splitlines() if "Video:" in line)
    w, h = map(int, re.search(r"\b(\d{2,})x(\d{2,})\b", line).groups())
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def ffmpeg_processes_under(folder: Path) -> list[int]:
    """PIDs of live processes whose command line mentions `folder` (an ffmpeg writing there, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().split()[2]
            except OSError:
                continue
            if str(folder) in cmdline and "ffmpeg" in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture
def latents_file(tmp_path) -> Path:
    path = tmp_path / "lat.pt"
    write_latents(path, (16, 3, 3, 5), fps=12.0)
    return path


def read_tags(path: Path) -> dict[str, str]:
    """The container's global tags as ffmpeg reads them back (names lower-cased: Matroska stores COMMENT)."""
    return read_metadata(path)[0]


def read_metadata(path: Path) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]]]:
    """Everything ffmpeg reads back as metadata: the global tags, then each section ([STREAM], [CHAPTER]) with its
    own, parsed from ffmpeg's own ffmetadata output (which escapes = ; # \\ and line ends with a backslash)."""
    text = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True,
                          check=True).stdout.decode()
    tags: dict[str, str] = {}
    sections: list[tuple[str, dict[str, str]]] = []
    line, key, escaped, plain = [], None, False, ""  # plain: the line's unescaped characters, for section headers
    for ch in text.split("\n", 1)[1] + "\n":
        if escaped:
            line.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "=" and key is None:
            key, line = "".join(line), []
        elif ch == "\n":
            if key is not None:
                (sections[-1][1] if sections else tags)[key.lower()] = "".join(line)
            elif plain.startswith("[") and plain.endswith("]"):
                sections.append((plain[1:-1], {}))
            line, key, plain = [], None, ""
            continue
        else:
            line.append(ch)
        plain += ch if not escaped and ch != "\\" else ""
    return tags, sections


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: control characters, DEL, quotes and backslashes escaped."""
    # A lone surrogate, escaped too, is not a Unicode scalar value: TOML refuses the file, as it should.
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 32 or c in '\x7f"\\' or 0xD800 <= ord(c) < 0xE000 else c
                         for c in text) + '"'


def audio_track(path: Path) -> tuple[str, float]:
    """The first audio stream's codec and its duration in seconds, counted from its decoded samples."""
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    codec = re.search(r"Stream #\d+:\d+.*?: Audio: (\w+)", probe).group(1)
    pcm = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "-ac", "1",
                          "-ar", "48000", "-"], capture_output=True, check=True).stdout
    return codec, len(pcm) / 2 / 48000


def make_audio(path: Path, seconds: float, *args: str) -> Path:
    """A sine tone of `seconds`, encoded as `path`'s extension says (extra ffmpeg output args in `args`)."""
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}:sample_rate=48000", *args, str(path)], check=True)
    return path


def frame_times(path: Path) -> list[tuple[Fraction, bool]]:
    """Each decoded frame's presentation time (exact, from its pts and the stream's time base) and whether it is a
    keyframe, as ffmpeg itself reads the file."""
    log = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path), "-vf", "showinfo", "-f", "null", "-"],
                         capture_output=True, text=True).stderr
    base = Fraction(re.search(r"config in time_base: (\d+/\d+)", log).group(1))
    return [(int(m.group(1)) * base, m.group(2) == "1")
            for m in re.finditer(r"\bn:\s*\d+ pts:\s*(-?\d+) .*? iskey:(\d)", log)]
