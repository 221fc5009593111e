"""Helpers shared by the CPU and GPU stress tests: a sink that keeps frames, and random lane delays."""

import random

import torch

from vaepipe.decode import decode_stream, to_uint8_frames
from vaepipe.pipeline import Buffers, run_lanes


class MemorySink:
    def __init__(self):
        self.frames: list[torch.Tensor] = []
        self.aborted = False

    def write(self, frames: torch.Tensor) -> None:
        self.frames.append(frames.clone())

    def abort(self) -> None:
        self.aborted = True


def reference_frames(vae, z) -> torch.Tensor:
    """uint8 frames of diffusers' whole decode, converted in one go: what every lane schedule must reproduce."""
    with torch.inference_mode():
        video = vae.decode(z).sample
        out = torch.empty(video.shape[2], *video.shape[3:], 3, dtype=torch.uint8, device=video.device)
        to_uint8_frames(video, out)
    return out.cpu()


def jitter(seed: int, max_s: float):
    rng = random.Random(seed)
    return lambda lane: rng.random() * max_s


def decode_with_lanes(vae, z, *, buffers: Buffers | None = None, delays=None, **options) -> tuple[torch.Tensor, dict]:
    sink = MemorySink()
    with torch.inference_mode():
        frame_shape = (z.shape[3] * vae.config.scale_factor_spatial, z.shape[4] * vae.config.scale_factor_spatial, 3)
        chunk = options.pop("chunk", 1)
        stats = run_lanes(decode_stream(vae, z), sink, device=z.device, frame_shape=frame_shape,
                          frames_per_chunk=4 * chunk, chunk=chunk, buffers=buffers or Buffers(), jitter=delays,
                          **options)
    return torch.cat(sink.frames), stats
