"""The decode engine for Wan VAEs (`AutoencoderKLWan`: Wan 2.1, and Wan 2.2's z48 / patch-2 / residual VAE).

One engine, two arithmetic policies (kernels.py says what differs):
- fast (the default on GPUs): fused freely, as close to an fp32 decode as diffusers' own bf16 decode;
- exact (`--exact` on GPUs): diffusers' bits. The first time a process decodes with a VAE at a frame size, a
  self-check compares the engine's first pieces of the clip (1 + k latent frames, one more with a remainder) with
  diffusers' decode of the same latent frames, and each conv's ways with the fingerprints of diffusers' conv
  outputs in that decode; if the bits differ, it runs every op both ways, and every op whose bits differ (another
  GPU, cuDNN, torch or diffusers) runs diffusers' way from then on; `fallbacks` says which.

    engine = Engine(vae, exact=True)
    for piece in engine.stream(z):        # z: [1, C, T, h, w], denormalised, on the VAE's device and dtype
        piece.write_uint8(frames)         # uint8 [F, H, W, 3], straight from the last conv
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import bands
from . import kernels, tuning
from .decoder import Context, Decoder, Op
from .kernels import Pending

CHUNKS = (4, 2, 1)
"""Latent frames per decoder call after the first, largest first: the engine takes the largest that fits."""
FRAMES_BUDGET = 60
"""Full-resolution activation frames (of the last stage's width) the engine may hold at once: what diffusers' own
decode holds at its peak (4.38 GiB = 61 such frames at 480x832 on an H100), so that the engine never needs more
memory than the decode it replaces. Measured on the H100 at 480x832 (bench's decoders table): 1.88 GiB at one latent
frame per call, 3.61 at two, 7.07 at four: about 2 frames plus 24 per latent frame per call."""

VERIFIED_WIDTH = 96
"""The exact policy's kernels are verified on decoders at least this wide (the real Wan VAEs: 96 channels at full
resolution for Wan 2.1, 256 for Wan 2.2). On the H200 the tiny test VAEs (8 and 16 channels) passed the self-check
and still decoded some clips to other bits (reason not found), so narrower decoders run every op diffusers' way."""


def supports(vae: torch.nn.Module) -> bool:
    from diffusers import AutoencoderKLWan

    return isinstance(vae, AutoencoderKLWan)


@dataclass(slots=True)
class Piece:
    """Frames of one decoder call, as the last conv left them; shaped like the video [1, 3, F, H, W] they make."""

    value: Pending
    op: Op
    patch: int

    @property
    def shape(self) -> torch.Size:
        _, c, f, h, w = self.value.shape
        return torch.Size((1, c // (self.patch * self.patch), f, h * self.patch, w * self.patch))

    def write_uint8(self, out: torch.Tensor) -> None:
        """uint8 frames into `out` [F, H', W', 3], H' >= H and W' >= W (extra rows and columns left to the caller)."""
        f, h, w = self.shape[2:]
        region = out[:f, :h, :w]
        self.op.ctx.write(self.op, [region], lambda: kernels.to_uint8(self.value, region, patch=self.patch),
                          lambda: kernels.to_uint8_reference(self.value, region, patch=self.patch))

    def video(self) -> torch.Tensor:
        """The decoded video [1, 3, F, H, W] in [-1, 1] as diffusers returns it (for tests and fidelity checks)."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        v = kernels.materialize_reference(self.value)
        return torch.clamp(unpatchify(v, patch_size=self.patch) if self.patch > 1 else v, -1.0, 1.0).contiguous()


class Engine:
    def __init__(self, vae: torch.nn.Module, *, exact: bool, chunk: int | None = None):
        self.vae = vae
        self.exact = exact
        self.chunk = chunk
        """Latent frames per decoder call after the first; None: the largest of CHUNKS that fits in memory."""
        param = next(vae.parameters())
        self.ctx = Context(exact=exact, device=param.device)
        self.decoder = Decoder(self.ctx, vae.decoder)
        self.patch = vae.config.patch_size or 1
        self.final = Op(self.ctx, "uint8 frames")
        if exact and kernels.triton_ready(param) and self.decoder.conv_out.channels < VERIFIED_WIDTH:
            self.ctx.fall_back_everywhere(f"a decoder narrower than {VERIFIED_WIDTH} channels is not verified")
        self._checked: set[tuple] = set()
        self.diffusers_stream = False
        """Exact policy on GPUs: the self-check found diffusers' own decoder faster than the engine with its
        fallbacks, so the pieces come from diffusers' stream."""

    @property
    def check_s(self) -> float:
        """Seconds the self-checks took in all (exact policy): diffusers' decode of the checked latent frames with
        its conv outputs' fingerprints, the comparisons, and, where bits differed, the op-by-op pass."""
        return self.ctx.check_s

    @property
    def fallbacks(self) -> dict[str, str]:
        """Ops that run diffusers' way, and why (exact policy: what the self-check found)."""
        return dict(self.ctx.fallbacks)

    def report(self, latent_size: tuple[int, int]) -> dict:
        """For the summary: the policy, latent frames per call, self-check seconds and fallbacks."""
        return {"name": "engine", "policy": "exact" if self.exact else "fast", "chunk": self.chunk_for(*latent_size),
                "self_check_s": round(self.check_s, 4), "fallbacks": self.fallbacks}

    def chunk_for(self, height: int, width: int) -> int:
        """Latent frames per call for latents height x width: the largest whose activations fit in FRAMES_BUDGET
        full-resolution frames and in half the free memory."""
        if self.chunk:
            return self.chunk
        last = self.decoder.conv_out
        size = self.vae.config.get("scale_factor_spatial") or 8
        frame = last.channels * (height * size // self.patch) * (width * size // self.patch) * last.weight.itemsize
        free = torch.cuda.mem_get_info(self.ctx.device)[0] if self.ctx.device.type == "cuda" else 1 << 62
        for k in CHUNKS:
            need = (4 + 24 * k) * frame
            if need <= min(FRAMES_BUDGET * frame, free // 2):
                return k
        return 1

    def max_frames(self, height: int, width: int) -> int:
        """The most frames one piece holds."""
        return self.chunk_for(height, width) * (self.vae.config.get("scale_factor_temporal") or 4)

    def stream(self, z: torch.Tensor) -> Iterator[Piece]:
        """Decode one sample `z` [1, C, T, h, w] (denormalised, on the VAE's device and dtype) piece by piece."""
        from ..decode import decode_stream

        _, _, frames, h, w = z.shape
        k = self.chunk_for(h, w)
        self.ctx.tune_cudnn = tuning.cudnn_tuning(self, h, w, k)  # (this machine's record: tuning.py)
        if not self.diffusers_stream:
            x = self.vae.post_quant_conv(z)  # diffusers' own call, on the whole latent as in `_decode`
            sizes = schedule(frames, k)
            pieces = self._stream(x, k, sizes)
            calls = self._unchecked_calls(h, w, k, sizes) if self.exact else 0
            held = []
            if calls:  # diffusers' decode of the first pieces' latent frames, then the pieces, each conv checked
                first = sizes[:calls]
                multi = {s + i for s, n in zip(itertools.accumulate(first, initial=0), first, strict=False) if n > 1
                         for i in range(n)}
                with self.ctx.check_time():
                    want, self.ctx.diffusers_prints = self._diffusers_clip(z, sum(first), prints_of=multi)
                try:
                    held = [next(pieces) for _ in range(calls)]
                finally:
                    self.ctx.diffusers_prints = None
                if not self._self_check(z, x, k, first, held, want):  # how ops run changed: decode again
                    pieces.close()
                    held, pieces = [], self._stream(x, k, sizes)
            if not self.diffusers_stream:
                yield from held
                yield from pieces
                return
            pieces.close()
        yield from (Piece(Pending(video), self.final, 1) for video in decode_stream(self.vae, z))

    def banded(self, z: torch.Tensor, plan: bands.Plan) -> Iterator[bands.Frames]:
        """Decode one sample `z` (as `stream`) in the bands of `plan` (vaepipe/bands.py): the frames of each call."""
        _, _, _, h, w = z.shape
        x = self.vae.post_quant_conv(z)
        self.decoder.setup(h, w, plan.chunk, tail=False)
        scale = self.vae.config.get("scale_factor_spatial") or 8
        tune, self.ctx.tune_cudnn = self.ctx.tune_cudnn, False
        try:
            yield from bands.stream(_Tail(self), x, plan, width=w * scale,
                                    temporal=self.vae.config.get("scale_factor_temporal") or 4)
        finally:
            self.ctx.tune_cudnn = tune

    def _timed(self, call):
        """(seconds, result) of call(), the GPU's work included."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        t = time.perf_counter()
        out = call()
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter() - t, out

    def _stream(self, x: torch.Tensor, k: int, sizes: list[int]) -> Iterator[Piece]:
        """The engine's pieces of post-quant latents `x`, one per decoder call of `sizes` latent frames."""
        _, _, _, h, w = x.shape
        self.decoder.setup(h, w, k)
        start = 0
        for i, n in enumerate(sizes):
            self.ctx.latent_start = start
            value, _ = self.decoder(x[:, :, start : start + n], first=i == 0)
            start += n
            yield Piece(value, self.final, self.patch)

    def _unchecked_calls(self, h: int, w: int, k: int, sizes: list[int]) -> int:
        """How many of the first calls the self-check must see: up to the last one whose shape (latent size, frames,
        first or not, at k frames per steady call) no check has seen yet in this process."""
        seen, calls = set(self._checked), 0
        for i, n in enumerate(sizes):
            shape = (h, w, k, n, i == 0)
            if shape not in seen:
                seen.add(shape)
                calls = i + 1
        return calls

    def _self_check(self, z: torch.Tensor, x: torch.Tensor, k: int, sizes: list[int], held: list[Piece],
                    want: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Compare the engine's first pieces of this clip (`held`, from calls of `sizes` latent frames, each conv
        already checked on them) with diffusers' decode of the same latent frames (`want`). Where the bits differ,
        find the ops that give them (every op run both ways, see Context.write), let those run diffusers' way, and
        compare again. True where the held pieces are diffusers' bits (the decode goes on from them); False where
        ops changed or the decoder ran again (decode again from the start).

        The pieces checked are the clip's own: the check adds diffusers' decode of its first 1 + k (+ 1) latent
        frames and the fingerprints of its conv outputs, and each call shape is checked once per process."""
        n = sum(sizes)
        x = x[:, :, :n]

        def engine_again() -> tuple[torch.Tensor, torch.Tensor]:  # (from the start: resets the decoder's caches)
            return self._engine_clip(list(self._stream(x, k, sizes)))

        printed, self.ctx.printed = self.ctx.printed, []
        with self.ctx.check_time():
            same = _same(self._engine_clip(held), want)
            if not same:
                for conv, key in printed:  # (their input may have differed: an op before them gave other bits)
                    conv.forget(key)
                self.ctx.checking = True
                try:
                    for _ in self._stream(x, k, sizes):
                        pass
                finally:
                    self.ctx.checking = False
                # Then the clip whole again: op by op is not enough (on the H200, the tiny test VAEs passed every
                # op's check and still decoded to other bits, reason not found). diffusers' way for every op gave
                # its bits in every case measured.
                engine_s, got = self._timed(engine_again)
                if not _same(got, want):
                    self.ctx.fall_back_everywhere("the self-check's clip, decoded whole, gave other bits than "
                                                  "diffusers'")
                    engine_s = None  # (timed before every op ran diffusers' way)
            if self.ctx.fallbacks and self.ctx.device.type == "cuda":  # (on the CPU the engine is for tests)
                # Where the fallbacks leave the engine slower than diffusers' own decoder, diffusers' stream runs.
                if same or engine_s is None:  # (same: a decode from the start; the held pieces' state is gone)
                    engine_s, _ = self._timed(engine_again)
                    same = False
                diffusers_s, _ = self._timed(lambda: self._diffusers_clip(z, n))  # (its first call set up plans)
                if engine_s > diffusers_s:
                    self.ctx.fallbacks["decoder"] = (f"with its fallbacks the engine decoded the check clip in "
                                                     f"{engine_s:.3f} s, diffusers' decoder in {diffusers_s:.3f} s: "
                                                     "diffusers' stream runs")
                    self.diffusers_stream = True
        _, _, _, h, w = z.shape
        self._checked.update((h, w, k, m, i == 0) for i, m in enumerate(sizes))
        return same

    def _engine_clip(self, pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
        """The video [1, 3, F, H, W] and uint8 frames [F, H, W, 3] of engine pieces."""
        videos, frames = [], []
        for piece in pieces:
            f, h, w = piece.shape[2:]
            frames.append(torch.empty((f, h, w, 3), dtype=torch.uint8, device=piece.value.raw.device))
            piece.write_uint8(frames[-1])
            videos.append(piece.video())
        return torch.cat(videos, dim=2), torch.cat(frames)

    def _diffusers_clip(self, z: torch.Tensor, n: int, prints_of: set[int] = frozenset()) -> tuple[
            tuple[torch.Tensor, torch.Tensor], dict[tuple[torch.nn.Module, int], torch.Tensor]]:
        """The same from diffusers' decode of z's first n latent frames (its own loop, `decode_stream`, on the whole
        latent: what `vae.decode(z)` computes for them) and the pipeline's uint8 conversion; and the fingerprint of
        each of the engine's conv modules' output in the decode of latent frames `prints_of`, by (module, frame)."""
        from ..decode import decode_stream, to_uint8_frames

        prints, latent = {}, 0

        def fingerprint(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            if latent in prints_of:  # (a 2-D conv's output is [frames, C, H, W])
                v = out if out.dim() == 5 else out.unsqueeze(0).transpose(1, 2)
                prints[(module, latent)] = kernels.fingerprints(v, v.shape[2])[0]

        hooks = [conv.module.register_forward_hook(fingerprint) for conv in self.decoder.convs()] if prints_of else []
        videos = []
        try:
            for video in itertools.islice(decode_stream(self.vae, z), n):  # a piece per latent frame
                videos.append(video)
                latent += 1
        finally:
            for hook in hooks:
                hook.remove()
        video = torch.cat(videos, dim=2)
        frames = torch.empty((*video.shape[2:], 3), dtype=torch.uint8, device=z.device)
        to_uint8_frames(video, frames)
        return (video, frames), prints


class _Tail:
    """The engine's decoder as the band loop runs it (bands.Tail): the head on whole frames, the tail per slab."""

    def __init__(self, engine: Engine):
        self.engine, self.decoder = engine, engine.decoder
        self.width = engine.decoder.size[1]

    def head(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        return kernels.materialize_reference(self.decoder.head(x))

    def start(self, s: bands.Slab, chunk: int) -> None:
        self.decoder.setup_tail(s.heights(), self.width, chunk)

    def state(self) -> list:
        return self.decoder.tail_state()

    def load(self, state: list) -> None:
        self.decoder.load_tail(state)

    def tail(self, x: torch.Tensor, s: bands.Slab, first: bool) -> Pending:
        return self.decoder.tail(Pending(x), x.shape[2], first, crop=s.crop)[0]

    def write(self, out: Pending, frames: torch.Tensor) -> None:
        Piece(out, self.engine.final, self.engine.patch).write_uint8(frames)


def schedule(frames: int, k: int) -> list[int]:
    """Latent frames per decoder call for a clip of `frames`: the first alone, then k at a time; the remainder one at
    a time, so that a clip of any length runs only three call shapes. The first remainder call comes right after the
    first, so that the self-check meets every call shape within 1 + 1 + k latent frames."""
    q, r = divmod(frames - 1, k)
    return [1] + [1] * min(r, 1) + [k] * q + [1] * max(r - 1, 0)


def _same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
