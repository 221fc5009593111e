"""Decoding in horizontal bands with halos: a frame too large for the card decodes band by band, and every band's
rows are the rows of the whole decode, not a blend of tiles.

A decoder splits where the frame stops mattering as a whole. Its head (Wan: conv_in and the mid block, whose
attention sees the whole frame, at latent resolution: small) runs on whole frames; its tail (the up blocks, 2-8x the
latent resolution: nearly all of the memory) runs one band at a time. A band's tail computes a slab: the band's rows
and the halo rows its convs read, recomputed from the head's output (nothing passes between bands, so bands are
independent: several devices can each run their own). At every stage boundary (an up block's input) the slab is cut
to the rows the rest of the decoder still needs, so the recomputed rows stay few where the frame is large. Rows of a
slab that its convs read past the band's halo are wrong (zero padding where the frame goes on) and are never used:
`slab()` derives each stage's rows backwards from the band's output rows.

The schedule: the clip's latent frames go in windows; the head decodes a window's frames whole, then each band runs
its tail over all of them with its own causal caches and writes its rows of uint8 frames into the window's frame
buffer, and the window's frames go on to the lanes (copy, encode), which do not change. With one window for the
whole clip a band's caches live only while it runs; with several, every band's caches are kept between windows, on
the GPU or in pinned host memory.

    chosen = choose(clip, limit=6 << 30)           # or plan(clip, bands=4)
    for piece in stream(tail, x, chosen, width=W, temporal=4):   # x: the head's input, [1, C, T, h, w]
        piece.write_uint8(frames)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import BadInput
from .memory import gib

Op = tuple[str, int]
"""One step of a tail that matters for rows: ("conv", halo rows it reads on each side) or ("up", factor)."""


@dataclass(frozen=True, slots=True)
class TailShape:
    """What the band loop and its memory model know of a decoder's tail, per stage (an up block; the last stage
    includes the output conv)."""

    ops: tuple[tuple[Op, ...], ...]
    """Each stage's convs and upsamplings, in order."""
    channels: tuple[int, ...]
    """Each stage's widest activation (channels)."""
    frames: tuple[int, ...]
    """Each stage's frames per latent frame (temporal upsampling)."""
    caches: tuple[tuple[int, int, int, int], ...]
    """(stage, channels, frames, halo) of each causal conv's cache; at the stage's input resolution."""
    head_channels: int
    """Channels of the head's output (what a window keeps of each latent frame)."""
    patch: int = 1
    """Output rows per tail output row (Wan 2.2's unpatchify)."""

    def heights(self, height: int) -> list[int]:
        """Rows at each stage's input and at the tail's output, for `height` rows at its input."""
        out = [height]
        for ops in self.ops:
            out.append(out[-1] * math.prod(n for kind, n in ops if kind == "up"))
        return out

    def ups(self) -> tuple[int, ...]:
        return tuple(math.prod(n for kind, n in ops if kind == "up") for ops in self.ops)


@dataclass(frozen=True, slots=True)
class Slab:
    """What one band computes: at each stage's input the rows [lo, hi) it needs (halos included, absolute rows at
    that stage's resolution), and the band's own rows of the tail's output."""

    needs: tuple[tuple[int, int], ...]
    rows: tuple[int, int]
    ups: tuple[int, ...]

    def heights(self) -> list[int]:
        return [hi - lo for lo, hi in self.needs]

    def out_height(self) -> int:
        return (self.needs[-1][1] - self.needs[-1][0]) * self.ups[-1]

    def crop(self, stage: int, x):
        """Cut the value entering `stage` (len(needs): the tail's output) to the rows the slab needs there; `x`'s
        rows are the previous stage's slab, upsampled (the head's output: the whole frame). `x` has `.rows(a, b)`
        (an engine value) or is a tensor [B, C, T, H, W]."""
        start = 0 if stage == 0 else self.needs[stage - 1][0] * self.ups[stage - 1]
        lo, hi = self.needs[stage] if stage < len(self.needs) else self.rows
        if isinstance(x, torch.Tensor):
            return x if (lo - start, hi - start) == (0, x.shape[3]) else x[:, :, :, lo - start : hi - start]
        return x.rows(lo - start, hi - start)


def slab(shape: TailShape, height: int, rows: tuple[int, int]) -> Slab:
    """The slab that gives output rows `rows` of a tail whose input has `height` rows: each conv needs `halo` more
    rows on each side of what its output must give (clipped at the frame's edges, where the zero padding is the
    frame's own), each upsampling by f needs rows [lo // f, ceil(hi / f))."""
    heights = shape.heights(height)
    lo, hi = rows
    needs = []
    for stage in reversed(range(len(shape.ops))):
        h = heights[stage + 1]
        for kind, n in reversed(shape.ops[stage]):
            if kind == "conv":
                lo, hi = max(0, lo - n), min(h, hi + n)
            else:
                lo, hi, h = lo // n, -(-hi // n), h // n
        needs.append((lo, hi))
    return Slab(tuple(reversed(needs)), rows, shape.ups())


def band_rows(height: int, bands: int, align: int) -> list[tuple[int, int]]:
    """`bands` bands of about equal height over `height` output rows, their edges on multiples of `align` (a
    latent row: every stage then cuts at the same place) where there are enough of those."""
    if not 1 <= bands <= height:
        raise BadInput(f"bands must be in 1..{height} for frames of {height} rows here, got {bands}")
    units, step = (height // align, align) if height % align == 0 and bands <= height // align else (height, 1)
    edges = [round(i * units / bands) * step for i in range(bands + 1)]
    return list(zip(edges, edges[1:], strict=False))


# ---------------------------------------------------------------------------------------------------------------------
# The plan and its memory model

ACTIVATION_MAPS = {"engine": 7.0, "diffusers": 8.5}
"""Activations of one band's tail at its peak, in feature maps of the last stage's width per output frame of a call
(the rest of the tail's stages are smaller). Measured on an H100 (bf16, Wan 2.1): the engine 1.88 GiB at one latent
frame per call at 480x832 = 7.0 maps of 4 frames (engine/__init__.py FRAMES_BUDGET); diffusers' decoder 5.6 GiB
at 720x1280 = 8.0 maps."""
HEAD_MAPS = 12.0
"""The head's working activations per latent frame of a call, in maps of its output (conv_in, mid block, attention)."""
SLACK = 1.10
"""The caching allocator's rounding and fragmentation over the sum of live tensors."""


@dataclass(kw_only=True, slots=True)
class Plan:
    """How one clip decodes in bands: the bands' slabs, latent frames per call, frames per window, cache place."""

    bands: int
    slabs: list[Slab]
    chunk: int
    """Latent frames per tail call after the first."""
    window: int
    """Latent frames the head decodes before the bands run (the clip's: one window)."""
    caches: str
    """Where the bands' caches wait between windows: "device" or "host" (one window: each band's live while it runs)."""
    need: int = 0
    """Bytes the memory model says the decode needs at its peak."""
    patch: int = 1
    why: str = ""
    """For the summary: how the plan was chosen."""

    def report(self) -> dict:
        return {"bands": self.bands, "rows": [s.rows[1] - s.rows[0] for s in self.slabs], "chunk": self.chunk,
                "window": self.window, "caches": self.caches, "model_gib": round(self.need / 2**30, 3),
                "why": self.why}


@dataclass(kw_only=True, slots=True)
class Clip:
    """What the memory model needs of one decode: its tail, sizes and the bytes that do not depend on bands."""

    shape: TailShape
    height: int
    """Rows at the tail's input (latent rows)."""
    width: int
    """Columns at the tail's input."""
    latent_frames: int
    itemsize: int
    fixed: int
    """Bytes held whatever the plan: weights, latents, lane buffers."""
    frame_bytes: int
    """One output frame in uint8 RGB."""
    temporal: int = 4
    activation_maps: float = ACTIVATION_MAPS["engine"]
    chunks: Sequence[int] = (1,)
    """Latent frames per call the decoder can run, largest first."""

    @property
    def align(self) -> int:
        """Output rows per latent row: where band edges fall, so that every stage cuts at the same place."""
        return math.prod(self.shape.ups())

    @property
    def out_height(self) -> int:
        return self.shape.heights(self.height)[-1]

    def frames_of(self, latent: int) -> int:
        return 1 + self.temporal * (latent - 1) if latent else 0

    def caches_bytes(self, s: Slab) -> int:
        heights = s.heights()
        widths = [self.width * math.prod(self.shape.ups()[:i]) for i in range(len(heights))]
        return sum(frames * c * (heights[st] + 2 * halo) * (widths[st] + 2 * halo) * self.itemsize
                   for st, c, frames, halo in self.shape.caches)

    def activation_bytes(self, s: Slab, chunk: int) -> int:
        """The widest stage's live activations: its slab (rows x columns x frames) at its widest channels."""
        heights, ups, most = s.heights(), self.shape.ups(), 0
        for stage, rows in enumerate(heights):
            width = self.width * math.prod(ups[:stage])
            most = max(most, self.shape.channels[stage] * rows * width * self.shape.frames[stage])
        last = len(heights) - 1  # (the last stage at its output resolution: its upsampled rows)
        out = self.width * math.prod(ups)
        most = max(most, self.shape.channels[last] * s.out_height() * out * self.shape.frames[last])
        return int(self.activation_maps * most * chunk * self.itemsize)

    def head_bytes(self, frames: int) -> int:
        return self.shape.head_channels * self.height * self.width * frames * self.itemsize

    def need(self, bands: int, chunk: int, window: int, caches: str) -> tuple[int, list[Slab]]:
        slabs = [slab(self.shape, self.height, r) for r in band_rows(self.out_height, bands, self.align)]
        band = max(self.caches_bytes(s) + self.activation_bytes(s, chunk) for s in slabs)
        kept = 0
        if window < self.latent_frames and caches == "device" and bands > 1:
            kept = sum(self.caches_bytes(s) for s in slabs) - max(self.caches_bytes(s) for s in slabs)
        frames = self.frames_of(window) if bands > 1 else 0  # one band: the lanes' buffers are its frame buffer
        head = HEAD_MAPS * self.head_bytes(chunk) + (self.head_bytes(window) if bands > 1 else 0)
        return int(SLACK * (self.fixed + band + kept + head + frames * self.frame_bytes)), slabs


def plan(clip: Clip, *, bands: int, chunk: int | None = None, window: int | None = None,
         caches: str | None = None, why: str = "") -> Plan:
    """The plan for a given band count: the smallest chunk (of `clip.chunks`) unless given, one window for the clip
    unless given, caches on the device unless given."""
    window = clip.latent_frames if window is None or bands == 1 else max(1, min(window, clip.latent_frames))
    caches = caches or "device"
    k = chunk or clip.chunks[-1]
    need, slabs = clip.need(bands, k, window, caches)
    return Plan(bands=bands, slabs=slabs, chunk=k, window=window, caches=caches, need=need,
                patch=clip.shape.patch, why=why)


def choose(clip: Clip, limit: int, *, caches: str | None = None, free: bool = False) -> Plan:
    """The fewest bands (then the most latent frames per call) whose modelled peak fits in `limit` bytes (--max-vram,
    or what is `free` on the device); raise BadInput naming the minimum where even the thinnest bands do not fit."""
    most = max(1, clip.out_height // clip.align)
    for bands in range(1, most + 1):
        # One window for the clip, unless its frames take more than a quarter of the limit: then windows of what
        # fits, every band's caches kept between them
        fit = clip.latent_frames if bands == 1 else max(
            1, min(clip.latent_frames, (limit // 4 // clip.frame_bytes - 1) // clip.temporal + 1))
        places = [caches] if caches else (["device"] if fit >= clip.latent_frames else ["device", "host"])
        for place in places:
            for k in clip.chunks:
                need, _ = clip.need(bands, k, fit, place)
                if need <= limit:
                    return plan(clip, bands=bands, chunk=k, window=fit, caches=place,
                                why=f"fewest bands whose modelled peak ({gib(need)}) fits in {gib(limit)}"
                                    + (" free" if free else ""))
    least, _ = clip.need(most, clip.chunks[-1], 1, "host")
    have, fix = ((f"{gib(limit)} is free", "free the device of other work") if free else
                 (f"the limit is {gib(limit)}", "raise --max-vram to at least that"))
    raise BadInput(f"decoding these frames needs at least {gib(least)} of device memory (the weights, the lane "
                   f"buffers and {most} bands of {clip.align} rows), but {have}: {fix}, or decode smaller frames")


# ---------------------------------------------------------------------------------------------------------------------
# The band loop


class Tail(Protocol):
    """A decoder split for bands (the engine's, or diffusers' own modules): the band loop runs it."""

    def head(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        """The head's output for latent frames `x` [1, C, n, h, w], materialised (kept while the bands run)."""

    def start(self, s: Slab, chunk: int) -> None:
        """Fresh (zero) causal caches for band `s`, calls of up to `chunk` latent frames: the current state."""

    def load(self, state: list) -> None: ...

    def state(self) -> list: ...

    def tail(self, x: torch.Tensor, s: Slab, first: bool):
        """The band's rows of the tail's output for head output `x`; something `write` takes."""

    def write(self, out, frames: torch.Tensor) -> None:
        """uint8 frames of the tail's output `out` into `frames` [F, rows, W, 3] (a view of the frame buffer)."""


@dataclass(slots=True)
class Frames:
    """A piece for the lanes: uint8 frames [F, H, W, 3] that the bands assembled."""

    frames: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        f, h, w, c = self.frames.shape
        return torch.Size((1, c, f, h, w))

    def write_uint8(self, out: torch.Tensor) -> None:
        f, h, w, _ = self.frames.shape
        out[:f, :h, :w].copy_(self.frames)


def stream(tail: Tail, x: torch.Tensor, p: Plan, *, width: int, temporal: int) -> Iterator[Frames]:
    """Decode `x` [1, C, T, h, w] (the head's input) in the bands of `p`; yield the frames of each call in order.
    `width`: output columns; `temporal`: frames per latent frame after the first."""
    from .engine import schedule  # (the engine's calls: the first alone, then `chunk` at a time)

    sizes = schedule(x.shape[2], p.chunk)
    height = p.slabs[-1].rows[1] * p.patch
    states: list[list] | None = None
    start = 0
    while start < len(sizes):  # one window: calls of at most p.window latent frames in all (at least one call)
        stop, latent = start + 1, sizes[start]
        while stop < len(sizes) and latent + sizes[stop] <= p.window:
            latent += sizes[stop]
            stop += 1
        first_latent = sum(sizes[:start])
        window = [(first_latent + sum(sizes[start:i]), sizes[i]) for i in range(start, stop)]
        heads = [tail.head(x[:, :, s : s + n], s == 0) for s, n in window]
        counts = [1 + temporal * (n - 1) if s == 0 else temporal * n for s, n in window]
        buffer = torch.empty((sum(counts), height, width, 3), dtype=torch.uint8, device=x.device)
        last = stop == len(sizes)
        kept = []
        for b, s in enumerate(p.slabs):
            if states is None:
                tail.start(s, p.chunk)
            else:
                tail.load(_to(states[b], x.device))
            f = 0
            for (at, _), head, n in zip(window, heads, counts, strict=True):
                tail.write(tail.tail(head, s, at == 0), buffer[f : f + n, s.rows[0] * p.patch : s.rows[1] * p.patch])
                f += n
            if not last:
                kept.append(_to(tail.state(), "cpu" if p.caches == "host" else x.device))
        states = kept or None
        del heads
        f = 0
        for n in counts:
            yield Frames(buffer[f : f + n])
            f += n
        start = stop


def _to(state: list, device) -> list:
    """A band's state (tensors, or nested lists and tuples of them) on `device`; to the host: pinned."""
    def move(v):
        if isinstance(v, torch.Tensor):
            if torch.device(device).type == "cpu" and v.is_cuda:
                return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, pin_memory=True).copy_(v)
            return v.to(device)
        if isinstance(v, (list, tuple)):
            return type(v)(move(u) for u in v)
        return v
    return move(state)
