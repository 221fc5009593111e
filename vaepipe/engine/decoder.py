"""diffusers' `WanDecoder3d`, rebuilt from the loaded model's weights around buffers allocated once.

What changes against diffusers' own decoder (and what does not):
- activations stay channels-last from the first conv to the last, so cuDNN runs no layout transposes;
- each causal conv reads one window [2 cached frames | t new frames] with its zero spatial border (diffusers' F.pad)
  already in place: its producer writes the new frames straight into the window, and the conv's own 2-frame cache
  is copied in before and out after (no `torch.cat`, no padding per call); windows are shared by convs of one shape;
- several latent frames per decoder call after the first (exact for causal convs);
- the conv bias, the residual add, the RMS norm and SiLU run as one kernel, the upsamplers' frame interleave and
  nearest upsampling as one gather, and Wan 2.2's DupUp3D shortcut as another (kernels.py);
- the fast policy's last conv (3 or 12 output channels, where cuDNN is slow) as a GEMM by every tap's weights and a
  sum of the shifted taps (kernels.conv_by_taps), and its 96- and 192-channel convs as a Triton implicit GEMM on
  Hopper (kernels.conv_gemm, faster than cuDNN's there);
- the attention block (once per latent frame, at latent resolution) and the post-quant conv are diffusers' own.

Every op has the engine's way and diffusers' way (`reference`). The exact policy's self-check runs both on the real
shapes and keeps diffusers' way for any op whose bits differ (see engine/__init__.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import Pending


@contextlib.contextmanager
def cudnn_benchmark(on: bool, deterministic: bool | None = None) -> Iterator[None]:
    """cuDNN's autotuning on or off (and its deterministic algorithms only, if asked) for the calls inside."""
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark = on
    if deterministic is not None:
        torch.backends.cudnn.deterministic = deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


def zeros_channels_last(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last_3d).zero_()


class Context:
    """What the ops of one engine share: the policy, the windows, and the self-check's state."""

    def __init__(self, *, exact: bool, device: torch.device):
        self.exact = exact
        self.device = device
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.checking = False
        """While True every op runs both ways, compares, and goes on with diffusers' bits."""
        self.tune_cudnn = True
        """Whether the steady calls' convs let cuDNN tune (tuning.py: per machine and frame size). Off in bands:
        every band's slab is a shape of its own, and timing each cost seconds and a workspace above the bands' peak
        on an H100."""
        self.diffusers_prints: dict[tuple[nn.Module, int], torch.Tensor] | None = None
        """While set (the exact policy's first pieces of a clip): the fingerprint of each conv module's output in
        diffusers' decode of latent frame i, by (module, i); each conv shape not yet checked keeps the first of its
        ways that gives those prints."""
        self.latent_start = 0
        """The first latent frame of the decoder's call that is running."""
        self.printed: list[tuple[Conv, tuple]] = []
        """The conv ways that the prints sent to diffusers' call, as (conv, key): where the clip differs, an op before
        them may be the cause, and the op-by-op pass checks them again."""
        self.check_s = 0.0
        """Seconds spent on checking: diffusers' ops and clip, and the comparisons."""
        self._timing = 0
        self.fallbacks: dict[str, str] = {}
        """Op name -> why it runs diffusers' way."""
        self.ops: list[Op] = []

    @staticmethod
    def window(channels: int, frames: int, height: int, width: int, halo: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """A [1, C, frames, height, width] channels-last conv input with a zero border of `halo` pixels (diffusers'
        F.pad). A new tensor per call, so that the caching allocator lends each window's memory to the next: only
        one window is alive at a time, and the producer writes every interior value."""
        window = torch.empty((1, channels, frames, height, width), dtype=dtype, device=device,
                             memory_format=torch.channels_last_3d)
        if halo:
            for edge in (window[:, :, :, :halo], window[:, :, :, -halo:], window[:, :, :, :, :halo],
                         window[:, :, :, :, -halo:]):
                edge.zero_()
        return window

    def write(self, op: Op, outputs: list[torch.Tensor], fast: Callable[[], None],
              reference: Callable[[], None]) -> None:
        """Run a writer op the engine's way (or diffusers' way where it fell back); while checking, both."""
        if op.reference or not self.checking:
            (reference if op.reference else fast)()
            return
        fast()
        got = [o.clone() for o in outputs]
        reference()
        if not all(torch.equal(g, o) for g, o in zip(got, outputs, strict=True)):
            self.fall_back(op, "its fused kernel gives other bits than diffusers' ops")

    @contextlib.contextmanager
    def check_time(self) -> Iterator[None]:
        """Count the time inside (the GPU's work included) as the self-check's; nested, only the outermost counts."""
        self._timing += 1
        if self._timing == 1 and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            self._timing -= 1
            if self._timing == 0:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.check_s += time.perf_counter() - t

    def fall_back(self, op: Op, why: str) -> None:
        op.reference = True
        self.fallbacks[op.name] = why

    def fall_back_everywhere(self, why: str) -> None:
        for op in self.ops:
            op.reference = True
        self.fallbacks["every op"] = why


TAPS_CHANNELS = 16
"""The fast policy runs 3x3x3 convs with at most this many output channels as `kernels.conv_by_taps`."""


class Way(NamedTuple):
    """How a conv runs: channels-last with cuDNN's tuned or untuned algorithm, over all of the call's frames at once
    or over diffusers' per-call extent; or diffusers' own call (NCDHW, per call, untuned)."""

    tuned: bool
    per_call: bool
    diffusers: bool = False


REFERENCE = Way(tuned=False, per_call=True, diffusers=True)


class Op:
    def __init__(self, ctx: Context, name: str):
        self.ctx = ctx
        self.name = name
        self.reference = False
        """Run diffusers' way: set by the exact policy's self-check when the engine's way gives other bits."""
        ctx.ops.append(self)


class Conv(Op):
    """A conv of the decoder: causal 3-D (`WanCausalConv3d`, its time padding served from its own 2-frame cache) or
    the upsamplers' 2-D one, over a window whose producer writes the new frames into `begin()`'s view."""

    def __init__(self, ctx: Context, name: str, module: nn.Conv3d | nn.Conv2d):
        super().__init__(ctx, name)
        self.module = module
        self.two_d = isinstance(module, nn.Conv2d)
        if self.two_d:
            self.time_pad, self.halo = 0, module.padding[0]
            self.weight = module.weight.detach().to(memory_format=torch.channels_last)
        else:  # WanCausalConv3d: diffusers' F.pad amounts (w, w, h, h, 2 * t, 0)
            self.time_pad, self.halo = module._padding[4], module._padding[0]
            self.weight = module.weight.detach().to(memory_format=torch.channels_last_3d)
        self.bias = module.bias.detach()
        self.taps = self.gemm = None
        """The fast policy's weights for `kernels.conv_by_taps` (few outputs) or `kernels.conv_gemm` (96 or 192
        outputs), where those run; else cuDNN runs the conv."""
        if not ctx.exact and kernels.triton_ready(self.weight):
            weight = module.weight.detach()
            if module.kernel_size == (3, 3, 3) and module.out_channels <= TAPS_CHANNELS:
                self.taps = kernels.tap_weights(weight)
            elif kernels.conv_gemm_ready(weight):
                self.gemm = kernels.gemm_weights(weight)
        self.cache: torch.Tensor | None = None
        self._window: torch.Tensor | None = None
        self.ways: dict[tuple[tuple[int, int], int], Way] = {}
        """(height x width, frames per call) -> the way the exact policy runs it (what its self-check chose)."""

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    def setup(self, height: int, width: int, frames: int) -> None:
        """Size the window for up to `frames` new frames of height x width, and zero the cache."""
        self.size = (height, width)
        self.max_frames = frames
        if self.time_pad:
            self.cache = zeros_channels_last((1, self.channels, self.time_pad, height + 2 * self.halo,
                                              width + 2 * self.halo), self.weight.dtype, self.weight.device)

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.zero_()

    def begin(self, frames: int) -> torch.Tensor:
        """The view [1, C, frames, H, W] the producer writes the new frames into."""
        h, w = self.size
        self._window = self.ctx.window(self.channels, self.time_pad + frames, h + 2 * self.halo, w + 2 * self.halo,
                                       self.halo, self.weight.dtype, self.weight.device)
        if self.time_pad:
            self._window[:, :, : self.time_pad].copy_(self.cache)
        p = self.halo
        return self._window[:, :, self.time_pad :, p : p + h, p : p + w]

    def finish(self, frames: int, per_call: int) -> Pending:
        """Run the conv over the window; keep its last 2 input frames as the next call's cache. `per_call` is the
        frame count of diffusers' per-latent-frame calls at this layer (its call extent)."""
        window, self._window = self._window, None
        if self.taps is not None:
            out = Pending(kernels.conv_by_taps(window, self.taps), self.bias)
        elif self.gemm is not None and kernels.FUSE_NORM_INTO_CONV:
            out = Pending(None, self.bias, conv=(window, self.gemm))  # run by its consumer: a norm fuses it in
        elif self.gemm is not None:  # now: the window goes before the consumer allocates the next one
            out = Pending(kernels.conv_gemm(window, self.gemm), self.bias)
        else:
            out = self._run(frames, per_call, lambda way: self._fast(window, frames, per_call, way),
                            lambda: self._reference(window, frames, per_call))
        if self.time_pad:
            self.cache.copy_(window[:, :, frames : frames + self.time_pad])
        return out

    def apply(self, x: torch.Tensor, per_call: int) -> torch.Tensor:
        """A 1x1x1 conv (the residual shortcut) on a tensor, materialised: the tensor is its own window."""
        frames = x.shape[2]
        out = self._run(frames, per_call, lambda way: self._fast(x, frames, per_call, way),
                        lambda: self._reference(x, frames, per_call))
        return kernels.materialize_reference(out)

    def _run(self, frames: int, per_call: int, fast: Callable[[Way], Pending],
             reference: Callable[[], Pending]) -> Pending:
        """The conv the engine's way: channels-last over all of the call's frames at once, with cuDNN's tuned
        algorithm for the steady calls (tuning pays there) and its untuned choice for the one-off first and last
        calls. Where that gives other bits, the exact policy's self-check tries channels-last over diffusers'
        call extent, untuned (cuDNN may pick another algorithm for a longer extent, as on Wan 2.2's last stage on
        the H200; its heuristic choice there is diffusers' kernel without the layout transposes), else diffusers'
        call.

        PyTorch keeps one cuDNN plan per conv shape, layout and dtype for the whole process, tuned or not:
        whichever call of that shape came first. So each extent has one candidate, and once the check has seen a
        way give diffusers' bits at a frame size, that way keeps giving them there in this process."""
        key = (self.size, frames)
        way = REFERENCE if self.reference else self.ways.get(key)
        if way is None and self.ctx.exact and self.two_d and frames == 1:
            # The first latent frame's 2-D upsampling convs: one frame, nothing to gain; on the H200 their
            # channels-last bits differed on Wan 2.2, and finding that out sends the self-check op by op (2.9 s).
            way = self.ways[key] = REFERENCE
        # The op-by-op pass checks every conv; the first pieces of a clip check the convs that have a choice (several
        # calls' frames at once or per call), on all of their frames: on the H200 a Wan 2.2 conv over several calls'
        # frames gave diffusers' bits in the first call's frames and not in the others.
        if way is None and (self.ctx.checking or self.ctx.diffusers_prints is not None and frames > per_call):
            return self._check(key, frames, per_call, fast, reference)
        if way is None:  # both policies' first choice (the exact one's self-check confirms it on the real shapes)
            way = Way(tuned=frames == self.max_frames and self.ctx.tune_cudnn, per_call=False)
        return reference() if way.diffusers else fast(way)

    def _check(self, key: tuple, frames: int, per_call: int, fast: Callable[[Way], Pending],
               reference: Callable[[], Pending]) -> Pending:
        """Keep the first of the engine's ways that gives diffusers' bits, else diffusers' call. Op by op, diffusers'
        call runs on the same input; on a clip's first pieces, each call's output is compared by its fingerprint
        with diffusers' in its own decode of the same latent frames (the input is the same where every op before
        gave diffusers' bits; the comparison of the pieces checks that), so that diffusers' convs run once."""
        ctx = self.ctx
        with ctx.check_time():
            if ctx.checking:
                want = reference()
                wanted = kernels.materialize_reference(want)

                def gives_it(got: Pending) -> bool:
                    return torch.equal(kernels.materialize_reference(got), wanted)
            else:
                want = None
                prints = [ctx.diffusers_prints.get((self.module, ctx.latent_start + i))
                          for i in range(frames // per_call)]

                def gives_it(got: Pending) -> bool:
                    return None not in prints and torch.equal(
                        kernels.fingerprints(kernels.materialize_reference(got), per_call), torch.stack(prints))
        ways = [Way(tuned=frames == self.max_frames and ctx.tune_cudnn, per_call=False)]
        if frames > per_call:
            ways.append(Way(tuned=False, per_call=True))
        for way in ways:
            got = fast(way)  # (not the check's time: the decode runs it, and its first call tunes cuDNN)
            with ctx.check_time():
                same = gives_it(got)
            if same:
                self.ways[key] = way
                return got  # its bias still pending, as the decode hands it on: the next op is checked on that
        self.ways[key] = REFERENCE
        ctx.fallbacks[self._fallback_name(key)] = "channels-last gives other bits than diffusers' call"
        if want is None:
            ctx.printed.append((self, key))
            return reference()
        return want

    def _fallback_name(self, key: tuple) -> str:
        return f"{self.name} ({key[1]} frames)"

    def forget(self, key: tuple) -> None:
        """Unchoose the way for `key` (the self-check will check it again)."""
        del self.ways[key]
        self.ctx.fallbacks.pop(self._fallback_name(key), None)

    @property
    def exact_bits(self) -> bool | None:
        """The exact policy takes deterministic algorithms only: one that adds in a varying order (split reductions
        with atomics) could pass the self-check and give other bits later."""
        return True if self.ctx.exact else None

    def _fast(self, window: torch.Tensor, frames: int, per_call: int, way: Way) -> Pending:
        starts = range(0, frames, per_call) if way.per_call else [0]
        extent = per_call if way.per_call else frames
        outs = []
        with cudnn_benchmark(way.tuned, self.exact_bits):
            for s in starts:
                if self.two_d:  # [1, C, T, H, W] channels-last-3d is [T, C, H, W] channels-last: no copy either way
                    out = F.conv2d(window[:, :, s : s + extent].permute(0, 2, 1, 3, 4)[0], self.weight)
                    outs.append(out.unsqueeze(0).permute(0, 2, 1, 3, 4))
                else:
                    outs.append(F.conv3d(window[:, :, s : s + self.time_pad + extent], self.weight))
        return Pending(_cat_frames(outs), self.bias)

    def _reference(self, window: torch.Tensor, frames: int, per_call: int) -> Pending:
        """diffusers' calls: NCDHW, per latent frame, bias inside, default (untuned) algorithms."""
        outs = []
        with cudnn_benchmark(False):
            for s in range(0, frames, per_call):
                if self.two_d:  # diffusers pads inside nn.Conv2d: hand it the interior
                    p = self.halo
                    x = window[:, :, s : s + per_call, p : window.shape[3] - p, p : window.shape[4] - p]
                    y = self.module(x.permute(0, 2, 1, 3, 4)[0].contiguous())
                    outs.append(y.unsqueeze(0).permute(0, 2, 1, 3, 4))
                else:
                    x = window[:, :, s : s + self.time_pad + per_call].contiguous()
                    outs.append(F.conv3d(x, self.module.weight, self.module.bias))
        return Pending(_cat_frames(outs))


def _cat_frames(outs: list[torch.Tensor]) -> torch.Tensor:
    """Per-call conv outputs as one channels-last tensor along time."""
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.contiguous(memory_format=torch.channels_last_3d)


class Norm(Op):
    """WanRMS_norm + SiLU (with the pending bias and residual add of its input) into the next conv's window."""

    def __init__(self, ctx: Context, name: str, module: nn.Module):
        super().__init__(ctx, name)
        self.gamma = module.gamma.detach().reshape(-1).contiguous()

    def __call__(self, src: Pending, y: torch.Tensor, x: torch.Tensor | None, per_call: int) -> None:
        ctx = self.ctx
        c, h, w = src.shape[1], src.shape[3], src.shape[4]
        plan = kernels.reduction_plan(c, per_call * h * w, sms=ctx.sms) + (True,) if ctx.exact else None

        def fast() -> None:
            kernels.norm_silu(src, self.gamma, y, x, exact=ctx.exact, frames_per_call=per_call, plan=plan)

        def reference() -> None:
            v = kernels.materialize_reference(src)
            if x is not None:
                x.copy_(v)
            y.copy_(kernels.norm_silu_reference(v, self.gamma, exact=ctx.exact, frames_per_call=per_call))

        ctx.write(self, [y] if x is None else [y, x], fast, reference)


class Gather(Op):
    """Pure data movement after the pending bias add: the upsamplers' interleave and nearest upsampling, or a plain
    materialisation (scale 1) into a window."""

    def __call__(self, src: Pending, out: torch.Tensor, *, scale: int, interleave: bool) -> None:
        self.ctx.write(self, [out], lambda: kernels.upsample(src, out, scale=scale, interleave=interleave),
                       lambda: out.copy_(kernels.upsample_reference(src, scale=scale, interleave=interleave)))


class DupUp(Op):
    """Wan 2.2's `DupUp3D` shortcut around an up block: pure data movement, into a channels-last tensor."""

    def __init__(self, ctx: Context, name: str, module: nn.Module):
        super().__init__(ctx, name)
        self.module = module

    def __call__(self, src: torch.Tensor, out: torch.Tensor, first: bool) -> None:
        self.ctx.write(self, [out], lambda: kernels.dup_up(src, out, self.module, first=first),
                       lambda: out.copy_(kernels.dup_up_reference(src, self.module, first=first)))


class ResBlock:
    def __init__(self, ctx: Context, name: str, m: nn.Module):
        self.ctx = ctx
        self.norm1, self.conv1 = Norm(ctx, f"{name}.norm1", m.norm1), Conv(ctx, f"{name}.conv1", m.conv1)
        self.norm2, self.conv2 = Norm(ctx, f"{name}.norm2", m.norm2), Conv(ctx, f"{name}.conv2", m.conv2)
        self.shortcut = Conv(ctx, f"{name}.conv_shortcut", m.conv_shortcut) if isinstance(
            m.conv_shortcut, nn.Conv3d) else None

    def convs(self) -> list[Conv]:
        return [self.conv1, self.conv2] + ([self.shortcut] if self.shortcut else [])

    def setup(self, h: int, w: int, frames: int) -> None:
        for conv in self.convs():
            conv.setup(h, w, frames)

    def __call__(self, x: Pending, frames: int, per_call: int) -> Pending:
        on_grid = x.conv is not None
        if x.bias is None and x.res is None:
            x_in, store = x.raw, None
        elif on_grid:  # materialise x while normalising it: the residual needs it. A pending conv_gemm fuses the norm
            # in, on its padded grid (see norm_silu), over the last block's residual where that is this value's
            # alone (it is on the grid too): one full-resolution tensor less at the peak
            x_in = store = x.res if x.owns_res else kernels.padded_grid(x.shape, self.conv1.weight.dtype,
                                                                       self.conv1.weight.device)
        else:
            x_in = store = torch.empty(x.shape, dtype=x.raw.dtype, device=x.raw.device,
                                       memory_format=torch.channels_last_3d)
        self.norm1(x, self.conv1.begin(frames), store, per_call)
        del x
        h = self.conv1.finish(frames, per_call)
        self.norm2(h, self.conv2.begin(frames), None, per_call)
        del h
        out = self.conv2.finish(frames, per_call)
        if self.shortcut is not None:
            return out.with_res(self.shortcut.apply(x_in, per_call))
        return out.with_res(x_in, owned=store is not None and on_grid)


class Attention:
    """diffusers' own WanAttentionBlock: once per latent frame, at latent resolution."""

    def __init__(self, ctx: Context, module: nn.Module):
        self.ctx, self.module = ctx, module

    def __call__(self, x: Pending, frames: int) -> Pending:
        v = kernels.materialize_reference(x).contiguous()
        if self.ctx.exact:  # diffusers' call extent: one frame
            out = torch.cat([self.module(v[:, :, i : i + 1]) for i in range(frames)], dim=2)
        else:
            out = self.module(v)
        return Pending(out.contiguous(memory_format=torch.channels_last_3d))


class Upsample:
    """WanResample in upsample2d or upsample3d mode: [time conv ->] interleave + nearest 2x -> 2-D conv."""

    def __init__(self, ctx: Context, name: str, m: nn.Module):
        self.temporal = m.mode == "upsample3d"
        self.time_conv = Conv(ctx, f"{name}.time_conv", m.time_conv) if self.temporal else None
        self.conv = Conv(ctx, f"{name}.resample.1", m.resample[1])
        self.into_window = Gather(ctx, f"{name}.time_conv.input")
        self.gather = Gather(ctx, f"{name}.upsample")

    def convs(self) -> list[Conv]:
        return [self.conv] + ([self.time_conv] if self.time_conv else [])

    def setup(self, h: int, w: int, frames: int) -> tuple[int, int, int]:
        if self.temporal:
            self.time_conv.setup(h, w, frames)
            frames *= 2
        self.conv.setup(2 * h, 2 * w, frames)
        return 2 * h, 2 * w, frames

    def __call__(self, x: Pending, frames: int, per_call: int, first: bool) -> tuple[Pending, int, int]:
        interleave = False
        if self.temporal:
            view = self.time_conv.begin(frames)
            self.into_window(x, view, scale=1, interleave=False)
            if first:  # diffusers' "Rep": the first latent frame skips the time conv, whose cache stays zero
                x = Pending(view)
            else:
                x = self.time_conv.finish(frames, per_call)
                interleave, frames, per_call = True, frames * 2, per_call * 2
        self.gather(x, self.conv.begin(frames), scale=2, interleave=interleave)
        del x
        return self.conv.finish(frames, per_call), frames, per_call


class UpBlock:
    """WanUpBlock (Wan 2.1) or WanResidualUpBlock (Wan 2.2: its DupUp3D shortcut around the block)."""

    def __init__(self, ctx: Context, name: str, m: nn.Module):
        self.resnets = [ResBlock(ctx, f"{name}.resnets.{i}", r) for i, r in enumerate(m.resnets)]
        upsampler = getattr(m, "upsampler", None) or (m.upsamplers[0] if getattr(m, "upsamplers", None) else None)
        prefix = f"{name}.upsampler" if hasattr(m, "upsampler") else f"{name}.upsamplers.0"
        self.upsampler = Upsample(ctx, prefix, upsampler) if upsampler is not None else None
        shortcut = getattr(m, "avg_shortcut", None)
        self.shortcut = DupUp(ctx, f"{name}.avg_shortcut", shortcut) if shortcut is not None else None

    def convs(self) -> list[Conv]:
        return [c for r in self.resnets for c in r.convs()] + (self.upsampler.convs() if self.upsampler else [])

    def setup(self, h: int, w: int, frames: int) -> tuple[int, int, int]:
        for r in self.resnets:
            r.setup(h, w, frames)
        return self.upsampler.setup(h, w, frames) if self.upsampler else (h, w, frames)

    def __call__(self, x: Pending, frames: int, per_call: int, first: bool) -> tuple[Pending, int, int]:
        if self.shortcut is not None:
            x_in = kernels.materialize_reference(x)
            x = Pending(x_in)
        for r in self.resnets:
            x = r(x, frames, per_call)
        if self.upsampler:
            x, frames, per_call = self.upsampler(x, frames, per_call, first)
        if self.shortcut is not None:
            residual = torch.empty(x.shape, dtype=x_in.dtype, device=x_in.device,
                                   memory_format=torch.channels_last_3d)
            self.shortcut(x_in, residual, first)
            x = x.with_res(residual)
        return x, frames, per_call


class Decoder:
    """WanDecoder3d as a function of one chunk of post-quant latents: [1, z, t, h, w] -> the last conv's output."""

    def __init__(self, ctx: Context, decoder: nn.Module):
        self.ctx = ctx
        self.conv_in = Conv(ctx, "conv_in", decoder.conv_in)
        mid = decoder.mid_block
        self.mid = [ResBlock(ctx, "mid_block.resnets.0", mid.resnets[0]), Attention(ctx, mid.attentions[0]),
                    ResBlock(ctx, "mid_block.resnets.1", mid.resnets[1])]
        self.up_blocks = [UpBlock(ctx, f"up_blocks.{i}", b) for i, b in enumerate(decoder.up_blocks)]
        self.norm_out = Norm(ctx, "norm_out", decoder.norm_out)
        self.conv_out = Conv(ctx, "conv_out", decoder.conv_out)
        self.size: tuple[int, int, int] | None = None

    def convs(self) -> list[Conv]:
        return [*self.head_convs(), *self.tail_convs()]

    def head_convs(self) -> list[Conv]:
        return [self.conv_in, *self.mid[0].convs(), *self.mid[2].convs()]

    def tail_convs(self) -> list[Conv]:
        return [*(c for b in self.up_blocks for c in b.convs()), self.conv_out]

    def setup(self, h: int, w: int, frames: int, *, tail: bool = True) -> None:
        """Size every window and cache for latents h x w and up to `frames` latent frames per call (once per size);
        zero the caches for a new clip. tail=False: the head's only (bands size the tail's per slab)."""
        if self.size != (h, w, frames, tail):
            self.size = (h, w, frames, tail)
            self.conv_in.setup(h, w, frames)
            for r in (self.mid[0], self.mid[2]):
                r.setup(h, w, frames)
            heights = []
            for block in self.up_blocks:
                heights.append(h)
                h *= 2 if block.upsampler else 1
            if tail:
                self.setup_tail(heights, w, frames)
        for conv in self.convs() if tail else self.head_convs():
            conv.reset()

    def setup_tail(self, heights: list[int], w: int, frames: int) -> None:
        """Size the up blocks' and the last conv's windows and caches (zeroed) for a slab whose rows at each up
        block's input are `heights` (bands, see vaepipe/bands.py)."""
        for block, h in zip(self.up_blocks, heights, strict=True):
            h, w, frames = block.setup(h, w, frames)
        self.conv_out.setup(h, w, frames)

    def tail_state(self) -> list[tuple]:
        """The tail's per-slab state: each conv's frame size and causal cache."""
        return [(conv.size, conv.cache) for conv in self.tail_convs()]

    def load_tail(self, state: list[tuple]) -> None:
        for conv, (size, cache) in zip(self.tail_convs(), state, strict=True):
            conv.size, conv.cache = size, cache

    def __call__(self, latents: torch.Tensor, first: bool) -> tuple[Pending, int]:
        return self.tail(self.head(latents), latents.shape[2], first)

    def head(self, latents: torch.Tensor) -> Pending:
        """conv_in and the mid block, on whole frames: the attention sees the whole frame."""
        frames = latents.shape[2]
        self.conv_in.begin(frames).copy_(latents)
        x = self.conv_in.finish(frames, 1)
        x = self.mid[0](x, frames, 1)
        x = self.mid[1](x, frames)
        return self.mid[2](x, frames, 1)

    def tail(self, x: Pending, frames: int, first: bool,
             crop: Callable[[int, Pending], Pending] | None = None) -> tuple[Pending, int]:
        """The up blocks and the last conv on the head's output `x`. `crop(i, x)` (bands) cuts the value entering up
        block i (i = len(up_blocks): the last conv's output) to the rows the slab computes there."""
        per_call = 1
        for i, block in enumerate(self.up_blocks):
            if crop:
                x = crop(i, x)
            x, frames, per_call = block(x, frames, per_call, first)
        self.norm_out(x, self.conv_out.begin(frames), None, per_call)
        del x
        out = self.conv_out.finish(frames, per_call)
        return (crop(len(self.up_blocks), out) if crop else out), frames
