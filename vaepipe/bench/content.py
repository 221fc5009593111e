"""What the encoder is given. Random weights decode to noise, the worst case for an encoder and content no user has;
`natural` frames are a slow pan and zoom over sample photographs (scikit-image's, read with ffmpeg), the same size
and count as the decoded ones, made once before timing. And the PSNR of an encoded video against the frames it got.

    canvas   coffee | astronaut | chelsea          two rows of photographs at 512 px height (1024 x 1526)
             motorcycle | rocket
    frame t  a window of 80 % of the canvas, moving on slow sines (periods of 160, 330 and 250 frames for x, y and
             a 10 % zoom), resampled bilinearly: the same scene at every clip size, 2-4 px of motion per frame at
             480x832
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..encode import ffmpeg_exe
from ..errors import BadInput

CONTENTS = ("natural", "noise")
PHOTOGRAPHS = (("coffee.png", "astronaut.png", "chelsea.png"), ("motorcycle_left.png", "rocket.jpg"))
ROW_HEIGHT = 512
SOURCE = "a pan and zoom over scikit-image's sample photographs (coffee, astronaut, chelsea, motorcycle, rocket)"


def photograph_folder() -> Path:
    """scikit-image's data folder, found without importing the package (only its files are read)."""
    spec = importlib.util.find_spec("skimage")
    folder = Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None
    if folder is None or not all((folder / name).is_file() for row in PHOTOGRAPHS for name in row):
        raise BadInput("--content natural pans over scikit-image's sample photographs: pip install scikit-image (or "
                       "'vaepipe[natural]'), or use --content noise")
    return folder


def _read_image(path: Path) -> torch.Tensor:
    """An image file as uint8 [H, W, 3], decoded by ffmpeg."""
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    line = next(line for line in probe.splitlines() if "Video:" in line)
    w, h = (int(v) for v in re.search(r"\b(\d{2,})x(\d{2,})\b", line).groups())
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(h, w, 3)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float [3, H, W] (or [1, 3, H, W]) resized with antialiasing."""
    x = image if image.dim() == 4 else image[None]
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


@functools.cache
def canvas() -> torch.Tensor:
    """float32 [3, 1024, W]: the photographs in two rows at ROW_HEIGHT, cut to the shorter row."""
    folder = photograph_folder()
    rows = []
    for names in PHOTOGRAPHS:
        parts = []
        for name in names:
            image = _read_image(folder / name).permute(2, 0, 1).float()
            parts.append(_resize(image, ROW_HEIGHT, round(image.shape[2] * ROW_HEIGHT / image.shape[1]))[0])
        rows.append(torch.cat(parts, dim=2))
    width = min(r.shape[2] for r in rows)
    return torch.cat([r[:, :, :width] for r in rows], dim=1)


def natural_frames(count: int, height: int, width: int, *, source: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [count, height, width, 3]: frame t of the pan and zoom. `source` replaces the photographs (tests)."""
    picture = canvas() if source is None else source
    ch, cw = picture.shape[1:]
    scale = min(ch / height, cw / width) * 0.8  # canvas pixels per frame pixel: the window covers 80 %
    big_h, big_w = round(ch / scale), round(cw / scale)
    picture = _resize(picture, big_h, big_w)  # once, with antialiasing: each frame then samples near 1:1
    ax, ay = (big_w - width) / 2 * 0.9, (big_h - height) / 2 * 0.9
    out = torch.empty(count, height, width, 3, dtype=torch.uint8)
    for t in range(count):
        zoom = 1 - 0.1 * (1 - math.cos(2 * math.pi * t / 250)) / 2
        cx = big_w / 2 + ax * math.sin(2 * math.pi * t / 160)
        cy = big_h / 2 + ay * math.sin(2 * math.pi * t / 330)
        theta = torch.tensor([[[width * zoom / big_w, 0.0, 2 * cx / big_w - 1],
                               [0.0, height * zoom / big_h, 2 * cy / big_h - 1]]])
        grid = F.affine_grid(theta, [1, 3, height, width], align_corners=False)
        frame = F.grid_sample(picture, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[t] = frame[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8)
    return out


def psnr(path: Path, reference: torch.Tensor, *, batch: int = 32) -> float | None:
    """PSNR in dB of the video at `path`, decoded by ffmpeg to RGB, against the frames it was given (uint8
    [F, H, W, 3]); over all frames and channels; 100.0 when identical. None if the frame count or size differs."""
    n, h, w, _ = reference.shape
    proc = subprocess.Popen([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                             "-"], stdout=subprocess.PIPE)
    squared, seen, size = 0.0, 0, h * w * 3
    try:
        while chunk := proc.stdout.read(size * batch):
            got = np.frombuffer(chunk, np.uint8)
            if got.size % size or seen + got.size // size > n:
                return None
            got = got.reshape(-1, h, w, 3).astype(np.float64)
            want = reference[seen : seen + got.shape[0]].numpy().astype(np.float64)
            squared += float(((got - want) ** 2).sum())
            seen += got.shape[0]
    finally:
        proc.stdout.close()
        proc.wait()
    if seen != n or proc.returncode != 0:
        return None
    mse = squared / (n * size)
    return round(10 * math.log10(255**2 / mse), 3) if mse else 100.0
