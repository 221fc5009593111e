"""The engine's fused kernels: each Triton kernel beside the PyTorch reference of what it computes.

Activations are 5-D [1, C, T, H, W] tensors of any strides (the engine keeps them channels-last, so that one pixel's
channels are contiguous). A conv output is handed on as a `Pending` value, `raw (+ bias) (+ res)`, and the next kernel
materialises it while it reads it: the conv bias and the residual add cost no pass of their own. Materialising rounds
where diffusers rounds (after the bias, after the residual add), under both policies.

Two arithmetic policies, one flag (`exact`):
- exact repeats diffusers' rounding steps: the RMS norm's sum of squares in the order of PyTorch's CUDA reduction for
  diffusers' call (see `reduction_plan`), IEEE square root and division, the rounding to the model's dtype after each
  of diffusers' ops, SiLU as `x / (1 + expf(-x))` with CUDA's own expf;
- fast fuses freely: one fp32 tree sum, reciprocal square root, no intermediate rounding.

The references run wherever Triton cannot (the CPU): the exact ones are diffusers' own ops on the layout and frame
extent diffusers calls them with, so they are bit-identical to it by construction.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only installs: the references run
    triton = None


class Pending:
    """A value not yet written out: `raw (+ bias over channels) (+ res)`, rounded to raw's dtype after each add.

    raw may itself be pending: a `conv_gemm` not yet run (`conv` = (window, weights)). `norm_silu` runs it with the
    norm in its epilogue, so that the conv's output never goes through memory; reading `raw` runs it plainly.
    `owns_res`: nothing else reads res, so the value may be materialised over it."""

    __slots__ = ("_raw", "bias", "res", "conv", "owns_res")

    def __init__(self, raw: torch.Tensor | None, bias: torch.Tensor | None = None, res: torch.Tensor | None = None,
                 conv: tuple[torch.Tensor, torch.Tensor] | None = None, owns_res: bool = False):
        self._raw, self.bias, self.res, self.conv, self.owns_res = raw, bias, res, conv, owns_res

    @property
    def raw(self) -> torch.Tensor:
        if self._raw is None:
            self._raw, self.conv = conv_gemm(*self.conv), None
        return self._raw

    @property
    def shape(self) -> torch.Size:
        return self._raw.shape if self._raw is not None else conv_gemm_shape(*self.conv)

    def with_res(self, res: torch.Tensor, *, owned: bool = False) -> Pending:
        return Pending(self._raw, self.bias, res, self.conv, owned)

    def rows(self, start: int, stop: int) -> Pending:
        """Rows [start, stop) of the value, as views (a band's slab, see vaepipe/bands.py); a pending conv runs."""
        if start == 0 and stop == self.shape[3]:
            return self
        return Pending(self.raw[:, :, :, start:stop], self.bias,
                       None if self.res is None else self.res[:, :, :, start:stop])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_ready(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on `t`: a CUDA tensor, or any under TRITON_INTERPRET=1 (the CPU tests)."""
    return triton is not None and (t.is_cuda or _interpreting())


# ---------------------------------------------------------------------------------------------------------------------
# References (PyTorch)


def materialize_reference(p: Pending) -> torch.Tensor:
    """diffusers' `conv(x)` bias add and `x + h`, as separate ops in the model's dtype."""
    v = p.raw
    if p.bias is not None:
        v = v + p.bias.view(1, -1, 1, 1, 1)
    if p.res is not None:
        v = v + p.res
    return v


def norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, *, exact: bool, frames_per_call: int) -> torch.Tensor:
    """SiLU(WanRMS_norm(x)): diffusers' `F.normalize(x.float(), dim=1).to(dtype) * scale * gamma + 0.0`, then SiLU.

    exact: on a contiguous tensor, `frames_per_call` frames at a time, as diffusers' per-latent-frame calls see it
    (PyTorch splits a reduction by its size, and with it the order of the sum).
    """
    c = x.shape[1]
    g = gamma.view(1, c, 1, 1, 1)
    if not exact:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().sum(1, keepdim=True).clamp_min(1e-24)) * (c**0.5) * g.float()
        return F.silu(y).to(x.dtype)
    parts = []
    for s in range(0, x.shape[2], frames_per_call):
        part = x[:, :, s : s + frames_per_call].contiguous()
        normalized = F.normalize(part.float(), dim=1).to(part.dtype)
        parts.append(F.silu(normalized * (c**0.5) * g + 0.0))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def upsample_reference(src: Pending, *, scale: int, interleave: bool) -> torch.Tensor:
    """diffusers' upsample3d tail (time-conv channels [2C] -> frames 2t: reshape and stack) and its nearest spatial
    upsampling (`WanUpsample`, nearest-exact in float): data movement after the bias add."""
    v = materialize_reference(src)
    if interleave:
        b, c2, t, h, w = v.shape
        v = v.reshape(b, 2, c2 // 2, t, h, w)
        v = torch.stack((v[:, 0], v[:, 1]), 3).reshape(b, c2 // 2, t * 2, h, w)
    if scale > 1:
        v = v.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    return v


def dup_up_reference(src: torch.Tensor, module: torch.nn.Module, *, first: bool) -> torch.Tensor:
    """diffusers' own `DupUp3D` module (Wan 2.2's shortcut), on diffusers' layout: data movement."""
    return module(src.contiguous(), first_chunk=first)


def to_uint8_reference(src: Pending, out: torch.Tensor, *, patch: int) -> None:
    """Wan's `unpatchify`, `clamp(-1, 1)`, then the uint8 frames of `postprocess_video` (float32, round half to even)
    into `out` [F, H, W, 3] (its real region)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    video = materialize_reference(src)
    if patch > 1:
        video = unpatchify(video, patch_size=patch)
    video = torch.clamp(video, min=-1.0, max=1.0)
    f, h, w = video.shape[2:]
    u8 = (video[0].float() * 0.5 + 0.5).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    out[:f, :h, :w].copy_(u8.permute(1, 2, 3, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints: the exact policy's self-check compares conv outputs with diffusers' by them


FINGERPRINT_MULTIPLIERS = (0x2545F4914F6CDD1D, 0x5851F42D4C957F2D)
"""The position weights' mixing constants (odd, below 2**63 so that Triton types them int64)."""


def fingerprint_rows(t: torch.Tensor, per_call: int) -> torch.Tensor:
    """[calls, values] int16/int32: the bits of t [1, C, F, H, W] (any strides), `per_call` frames a row, each row's
    values in channels-last order (a copy only where t is not channels-last already)."""
    v = t.contiguous(memory_format=torch.channels_last_3d)
    bits = v.view(torch.int16 if v.element_size() == 2 else torch.int32)
    return bits.permute(0, 2, 3, 4, 1).reshape(t.shape[2] // per_call, -1)


def fingerprints_reference(rows: torch.Tensor) -> torch.Tensor:
    """Each row's fingerprint: the sum of its values' bits times a pseudo-random odd weight of their position, modulo
    2**64 (int64 arithmetic wraps). Equal rows give equal fingerprints; a row that differs in one value never does
    (an odd weight times a 16- or 32-bit difference is never 0 modulo 2**64), in several, with odds of about 2**-64."""
    z = (torch.arange(rows.shape[1], dtype=torch.int64, device=rows.device) + 1) * FINGERPRINT_MULTIPLIERS[0]
    z = z ^ (z >> 29)
    z = z * FINGERPRINT_MULTIPLIERS[1]
    z = (z ^ (z >> 32)) | 1
    return (rows.to(torch.int64) * z).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# The order of PyTorch's CUDA sum for F.normalize over channels


def reduction_plan(channels: int, pixels: int, *, sms: int, threads_per_sm: int = 2048) -> tuple[int, int]:
    """(split, ctas): how PyTorch's CUDA reduction (Reduce.cuh, `setReduceConfig`) sums the squares of one pixel's
    `channels` values of a contiguous fp32 [1, C, pixels] tensor. Thread y of `split` threads (and CTA g of `ctas`)
    takes channels y + split * g + split * ctas * k, k = 0, 1, ..., into 4 accumulators (k mod 4), combined in order;
    the threads' sums are then added pairwise (halving), and with ctas > 1 the CTAs' sums are gathered by thread
    g mod split, in order, and added pairwise again."""
    vec = 4  # outputs per thread: the output extent and the input stride must divide it (base addresses are aligned)
    while pixels % vec:
        vec //= 2
    max_threads = 512 // vec
    dim0, dim1 = pixels // vec, channels

    def pow2(n: int) -> int:
        return 1 << (n.bit_length() - 1) if n < max_threads else max_threads

    width = min(pow2(dim0), 32)
    height = min(pow2(dim1), max_threads // width)
    width = min(pow2(dim0), max_threads // height)
    step_output = width
    if channels >= min(height * 16, 256):
        split = height
    else:
        split, step_output = 1, step_output * height
    ctas = 1
    per_thread = -(-channels // split)
    grid = -(-(pixels // vec) // step_output)
    target = sms * (threads_per_sm // (width * height))
    if split > 1 and per_thread >= 256 and grid <= target:
        ctas = max(min(-(-target // grid), -(-per_thread // 16)), -(-per_thread // 256))
    return split, ctas


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels. A Wan decode compiles about a dozen variants of them (channels x which inputs are pending), once:
# Triton keeps them on disk for the next process.

if triton is not None:
    # Strides stay specialised (knowing them divisible by 16 lets Triton issue vector loads), sizes do not.
    _RUNTIME = ["n_pix", "H", "W", "P"]

    def _jit(fn):
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        return triton.jit(fn, do_not_specialize=[n for n in _RUNTIME if n in names])

    @triton.jit
    def _pixels(p, H, W):
        """Pixel index -> (frame, row, column), int64 so that offsets never overflow."""
        p = p.to(tl.int64)
        return p // (H * W), (p // W) % H, p % W

    @triton.jit
    def _rounded(v, io: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 `v` rounded to the model's dtype `io` (to nearest even), as fp32. The CPU interpreter truncates in
        its bf16 casts, so there the rounding is done on the bits."""
        if io == tl.float32:
            return v
        elif INTERPRET and io == tl.bfloat16:
            u = v.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True)
        else:
            return v.to(io).to(tl.float32)

    @triton.jit
    def _materialize(raw_ptr, bias_ptr, res_ptr, raw_off, res_off, c, cmask, mask, HAS_BIAS: tl.constexpr,
                     HAS_RES: tl.constexpr, INTERPRET: tl.constexpr):
        """raw (+ bias[c]) (+ res), rounded as diffusers rounds; `c`, `cmask` broadcast against the pixels."""
        io: tl.constexpr = raw_ptr.dtype.element_ty
        v = tl.load(raw_ptr + raw_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            v = _rounded(v + b, io, INTERPRET)
        if HAS_RES:
            v = _rounded(v + tl.load(res_ptr + res_off, mask=mask, other=0.0).to(tl.float32), io, INTERPRET)
        return v

    @triton.jit
    def _expf(x, INTERPRET: tl.constexpr):
        # CUDA's own expf (what PyTorch's SiLU calls); the CPU interpreter has no libdevice
        if INTERPRET:
            return tl.exp(x)
        else:
            return libdevice.exp(x)

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v)
        frac = v - r  # exact
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)

    @triton.jit
    def _square_add(v, acc, FMA: tl.constexpr):
        # PyTorch's `acc + x * x`, which nvcc contracts into one fused multiply-add
        if FMA:
            return tl.fma(v, v, acc)
        else:
            return acc + v * v

    @triton.jit
    def _halving_sum(v, BLOCK_P: tl.constexpr, N: tl.constexpr):
        """[BLOCK_P, N] -> [BLOCK_P] as PyTorch's block_y_reduce adds: v[y] += v[y + n / 2] for n = N, N / 2, ..."""
        if N >= 16:
            v = tl.sum(tl.reshape(v, (BLOCK_P, 2, 8)), axis=1)
        if N >= 8:
            v = tl.sum(tl.reshape(v, (BLOCK_P, 2, 4)), axis=1)
        if N >= 4:
            v = tl.sum(tl.reshape(v, (BLOCK_P, 2, 2)), axis=1)
        if N >= 2:
            v = tl.sum(tl.reshape(v, (BLOCK_P, 2, 1)), axis=1)
        return tl.reshape(v, (BLOCK_P,))

    @triton.jit
    def _ordered_sum_of_squares(raw_ptr, bias_ptr, res_ptr, raw_pix, res_pix, r_sc, q_sc, pmask, C: tl.constexpr,
                                K: tl.constexpr, ctas: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                                BLOCK_P: tl.constexpr, SPLIT: tl.constexpr, FMA: tl.constexpr,
                                INTERPRET: tl.constexpr):
        """The sum of squares of each pixel's C values in the order `reduction_plan` describes: thread y of CTA g
        takes value k = 0, 1, ... K - 1 of its share into accumulator k mod 4 (masked values add zeros, which change
        no sum of squares). The 4 x SPLIT accumulators stay in load order until the end: taking them apart once,
        not per load, keeps the loop free of register shuffles."""
        slot = tl.arange(0, 4 * SPLIT)  # accumulator j = slot // SPLIT of thread y = slot % SPLIT
        y = tl.arange(0, SPLIT)
        gathered = tl.zeros([BLOCK_P, SPLIT], tl.float32)  # what the last CTA's thread y sums of the CTAs' sums
        for g in range(ctas):
            acc = tl.zeros([BLOCK_P, 4 * SPLIT], tl.float32)
            for k in range(0, K, 4):
                # Values k..k+3 of each thread's share in one load (contiguous channels when ctas == 1).
                c = (k + slot // SPLIT) * ctas * SPLIT + g * SPLIT + slot % SPLIT
                cm = (c < C)[None, :]
                v = _materialize(raw_ptr, bias_ptr, res_ptr, raw_pix[:, None] + c[None, :] * r_sc,
                                 res_pix[:, None] + c[None, :] * q_sc, c[None, :], cm, pmask[:, None] & cm, HAS_BIAS,
                                 HAS_RES, INTERPRET)
                acc = _square_add(v, acc, FMA)
            # Each thread's accumulators apart, once: ((a0 + a1) + a2) + a3.
            a = tl.reshape(tl.permute(tl.reshape(acc, (BLOCK_P, 4, SPLIT)), (0, 2, 1)), (BLOCK_P, SPLIT, 2, 2))
            even, odd = tl.split(a)
            a0, a2 = tl.split(even)
            a1, a3 = tl.split(odd)
            part = _halving_sum(((a0 + a1) + a2) + a3, BLOCK_P, SPLIT)
            gathered += tl.where((y == g % SPLIT)[None, :], part[:, None], 0.0)
        return _halving_sum(gathered, BLOCK_P, SPLIT)

    @_jit
    def _norm_silu_kernel(raw_ptr, bias_ptr, res_ptr, gamma_ptr, x_ptr, y_ptr, n_pix, H, W,
                          r_st, r_sh, r_sw, r_sc, q_st, q_sh, q_sw, q_sc, x_st, x_sh, x_sw, x_sc,
                          y_st, y_sh, y_sw, y_sc, scale,
                          C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_RES: tl.constexpr, STORE_X: tl.constexpr, EXACT: tl.constexpr, SPLIT: tl.constexpr,
                          K: tl.constexpr, CTAS: tl.constexpr, FMA: tl.constexpr, INTERPRET: tl.constexpr):
        """x = raw (+ bias) (+ res); optionally stores x; stores SiLU(RMSNorm(x) * gamma) into y.

        Fuses what diffusers runs as ten kernels (bias add, residual add, float cast, norm, clamp, division, cast,
        two multiplies, SiLU): one read of the conv output and one write per pixel, straight into the next conv's
        input window."""
        io: tl.constexpr = y_ptr.dtype.element_ty
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < n_pix
        t, h, w = _pixels(p, H, W)
        raw_pix = t * r_st + h * r_sh + w * r_sw
        res_pix = t * q_st + h * q_sh + w * q_sw
        c = tl.arange(0, C_PAD)
        cm = (c < C)[None, :]
        m = pmask[:, None] & cm
        v = _materialize(raw_ptr, bias_ptr, res_ptr, raw_pix[:, None] + c[None, :] * r_sc,
                         res_pix[:, None] + c[None, :] * q_sc, c[None, :], cm, m, HAS_BIAS, HAS_RES, INTERPRET)
        if STORE_X:
            tl.store(x_ptr + (t * x_st + h * x_sh + w * x_sw)[:, None] + c[None, :] * x_sc, v.to(io), mask=m)
        gamma = tl.load(gamma_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        if EXACT:
            ss = _ordered_sum_of_squares(raw_ptr, bias_ptr, res_ptr, raw_pix, res_pix, r_sc, q_sc, pmask, C, K, CTAS,
                                         HAS_BIAS, HAS_RES, BLOCK_P, SPLIT, FMA, INTERPRET)
            d = tl.maximum(tl.sqrt_rn(ss), 1e-12)
            n = _rounded(tl.div_rn(v, d[:, None]), io, INTERPRET)
            n = _rounded(n * scale, io, INTERPRET)
            n = _rounded(n * gamma, io, INTERPRET)
            n = _rounded(n + 0.0, io, INTERPRET)
            out = _rounded(tl.div_rn(n, 1.0 + _expf(-n, INTERPRET)), io, INTERPRET)
        else:
            ss = tl.sum(v * v, axis=1)
            n = v * (scale * tl.rsqrt(tl.maximum(ss, 1e-24)))[:, None] * gamma
            out = _rounded(n * tl.sigmoid(n), io, INTERPRET)
        tl.store(y_ptr + (t * y_st + h * y_sh + w * y_sw)[:, None] + c[None, :] * y_sc, out.to(io), mask=m)

    @_jit
    def _upsample_kernel(raw_ptr, bias_ptr, res_ptr, out_ptr, n_pix, H, W, C: tl.constexpr,
                         r_st, r_sh, r_sw, r_sc, q_st, q_sh, q_sw, q_sc, o_st, o_sh, o_sw, o_sc,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SCALE: tl.constexpr,
                         INTERLEAVE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                         INTERPRET: tl.constexpr):
        """out[f, y, x, c] = src[f // 2, y // S, x // S, (f % 2) * C + c] (interleave) or src[f, y // S, x // S, c].

        The time conv's two channel halves become frame pairs and each pixel becomes an S x S block, written into the
        next conv's input window in one pass: diffusers makes four copies (reshape, stack, permute, upsample)."""
        io: tl.constexpr = out_ptr.dtype.element_ty
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask = p < n_pix
        f, y, x = _pixels(p, H, W)
        if INTERLEAVE:
            src_t = f // 2
            src_c = (f % 2)[:, None] * C + c[None, :]
        else:
            src_t = f
            src_c = tl.zeros([BLOCK_P, 1], tl.int64) + c[None, :]
        m = pmask[:, None] & (c < C)[None, :]
        sy = y // SCALE
        sx = x // SCALE
        v = _materialize(raw_ptr, bias_ptr, res_ptr, (src_t * r_st + sy * r_sh + sx * r_sw)[:, None] + src_c * r_sc,
                         (src_t * q_st + sy * q_sh + sx * q_sw)[:, None] + src_c * q_sc, src_c, m, m, HAS_BIAS,
                         HAS_RES, INTERPRET)
        tl.store(out_ptr + (f * o_st + y * o_sh + x * o_sw)[:, None] + c[None, :] * o_sc, v.to(io), mask=m)

    @_jit
    def _dup_up_kernel(src_ptr, out_ptr, n_pix, H, W, C: tl.constexpr, s_st, s_sh, s_sw, s_sc,
                       o_st, o_sh, o_sw, o_sc, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, FT: tl.constexpr,
                       FS: tl.constexpr, REPEATS: tl.constexpr, SKIP: tl.constexpr):
        """out[c, f, y, x] = src[(c * FT * FS * FS + (f' % FT) * FS * FS + (y % FS) * FS + x % FS) // REPEATS,
        f' // FT, y // FS, x // FS], f' = f + SKIP: Wan 2.2's `DupUp3D` shortcut (repeat_interleave over channels,
        then channel groups spread over time and space), written channels-last in one pass; diffusers makes three
        copies (contiguous, repeat_interleave, permute)."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask = p < n_pix
        f, y, x = _pixels(p, H, W)
        f = f + SKIP
        sub = (f % FT) * (FS * FS) + (y % FS) * FS + x % FS
        src_c = (c[None, :] * (FT * FS * FS) + sub[:, None]) // REPEATS
        m = pmask[:, None] & (c < C)[None, :]
        src = ((f // FT) * s_st + (y // FS) * s_sh + (x // FS) * s_sw)[:, None] + src_c * s_sc
        v = tl.load(src_ptr + src, mask=m, other=0.0)
        tl.store(out_ptr + ((f - SKIP) * o_st + y * o_sh + x * o_sw)[:, None] + c[None, :] * o_sc, v, mask=m)

    @_jit
    def _to_uint8_kernel(raw_ptr, bias_ptr, out_ptr, n_pix, H, W, r_st, r_sh, r_sw, r_sc, o_sf, o_sh, o_sw,
                         BLOCK_P: tl.constexpr, PATCH: tl.constexpr, INTERPRET: tl.constexpr):
        """uint8 RGB from the last conv: its bias, Wan 2.2's unpatchify, clamp(-1, 1), then postprocess_video's
        float32 conversion (round half to even), straight into the copy lane's frame buffer."""
        io: tl.constexpr = raw_ptr.dtype.element_ty
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < n_pix
        f, y, x = _pixels(p, H, W)
        rgb = tl.arange(0, 4)
        m = pmask[:, None] & (rgb < 3)[None, :]
        src_c = rgb[None, :] * (PATCH * PATCH) + ((x % PATCH) * PATCH + y % PATCH)[:, None]
        src = (f * r_st + (y // PATCH) * r_sh + (x // PATCH) * r_sw)[:, None] + src_c * r_sc
        v = tl.load(raw_ptr + src, mask=m, other=0.0).to(tl.float32)
        v = _rounded(v + tl.load(bias_ptr + src_c, mask=m, other=0.0).to(tl.float32), io, INTERPRET)
        v = tl.minimum(tl.maximum(v, -1.0), 1.0)
        v = tl.minimum(tl.maximum(v * 0.5 + 0.5, 0.0), 1.0)  # v * 0.5 is exact, so one rounding as in PyTorch
        u8 = _round_half_even(v * 255.0).to(tl.uint8)
        tl.store(out_ptr + (f * o_sf + y * o_sh + x * o_sw)[:, None] + rgb[None, :], u8, mask=m)


    @_jit
    def _tap_sum_kernel(y_ptr, out_ptr, n_pix, H, W, P, o_t, o_h, o_w, o_c, COUT: tl.constexpr,
                        BLOCK_P: tl.constexpr):
        """out[c, t, h, w] = the sum over the 27 taps (dt, dy, dx), in tap order and in fp32, of
        y[tap * COUT + c, window pixel (t + dt, h + dy, w + dx)]: each load runs along a row of y."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = p < n_pix
        t, h, w = _pixels(p, H, W)
        base = (t * (H + 2) + h) * (W + 2) + w
        for c in tl.static_range(COUT):
            acc = tl.zeros([BLOCK_P], tl.float32)
            for tap in tl.static_range(27):
                row = (tap * COUT + c) * P.to(tl.int64)
                shift = ((tap // 9) * (H + 2) + (tap // 3) % 3) * (W + 2) + tap % 3
                acc += tl.load(y_ptr + row + base + shift, mask=mask, other=0.0)
            tl.store(out_ptr + t * o_t + h * o_h + w * o_w + c * o_c, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_kernel(a_desc, w0_desc, w1_desc, y0_desc, y1_desc, x0_desc, x1_desc, r0_desc, r1_desc, bias_ptr,
                     gamma_ptr, HW2, W2, H, W, scale, C: tl.constexpr, TAPS: tl.constexpr, N0: tl.constexpr,
                     N1: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                     STORE_X: tl.constexpr, INTERPRET: tl.constexpr):
        """An implicit-GEMM 3x3 (TAPS = 9) or 3x3x3 (27) conv over the window's padded grid: output row q is the sum
        over the taps of input row q + the tap's offset times the tap's weights, so that each tap's tile is one block
        of contiguous rows, which TMA loads (rows past the end read as zeros). BM rows by all N0 + N1 output channels
        (two dots: Triton's blocks are powers of 2), K = taps x C input channels, BK at a time; fp32 sums, rounded
        once; the tile stored by TMA into y's rows q.

        NORM: the epilogue stores what `_norm_silu_kernel` (fast) makes of the tile instead, as each pixel's channels
        are all in this program: x = conv + bias (+ res, its rows q), each add rounded as `_materialize` rounds,
        stored into x's rows q if STORE_X; SiLU(RMSNorm(x) * gamma) into y's. Rows are pixels of the padded grid
        throughout: y's row q is its pixel, one frame and one row and column of border further into the next window,
        and the grid's border rows (not pixels) store zeros, which land on that window's zero border."""
        q0 = tl.program_id(0) * BM
        acc0 = tl.zeros([BM, N0], tl.float32)
        acc1 = tl.zeros([BM, N1], tl.float32)
        CHUNKS: tl.constexpr = C // BK
        for i in range(TAPS * CHUNKS):
            tap = i // CHUNKS
            kc = (i % CHUNKS) * BK
            a = a_desc.load([q0 + (tap // 9) * HW2 + (tap // 3 % 3) * W2 + tap % 3, kc])
            acc0 = tl.dot(a, w0_desc.load([tap * C + kc, 0]), acc0)
            acc1 = tl.dot(a, w1_desc.load([tap * C + kc, N0]), acc1)
        io: tl.constexpr = y0_desc.dtype
        if not NORM:
            y0_desc.store([q0, 0], acc0.to(io))
            y1_desc.store([q0, N0], acc1.to(io))
        else:
            c0, c1 = tl.arange(0, N0), N0 + tl.arange(0, N1)
            v0 = _rounded(_rounded(acc0, io, INTERPRET) + tl.load(bias_ptr + c0).to(tl.float32)[None, :], io,
                          INTERPRET)
            v1 = _rounded(_rounded(acc1, io, INTERPRET) + tl.load(bias_ptr + c1).to(tl.float32)[None, :], io,
                          INTERPRET)
            if HAS_RES:
                v0 = _rounded(v0 + r0_desc.load([q0, 0]).to(tl.float32), io, INTERPRET)
                v1 = _rounded(v1 + r1_desc.load([q0, N0]).to(tl.float32), io, INTERPRET)
            if STORE_X:
                x0_desc.store([q0, 0], v0.to(io))
                x1_desc.store([q0, N0], v1.to(io))
            q = q0 + tl.arange(0, BM)
            pixel = (((q % HW2) // W2) < H) & ((q % W2) < W)
            inv = (scale * tl.rsqrt(tl.maximum(tl.sum(v0 * v0, axis=1) + tl.sum(v1 * v1, axis=1), 1e-24)))[:, None]
            n0 = v0 * inv * tl.load(gamma_ptr + c0).to(tl.float32)[None, :]
            n1 = v1 * inv * tl.load(gamma_ptr + c1).to(tl.float32)[None, :]
            # (a border row's res may hold anything, NaN included: select, not multiply by 0)
            y0_desc.store([q0, 0], tl.where(pixel[:, None], _rounded(n0 * tl.sigmoid(n0), io, INTERPRET), 0.0).to(io))
            y1_desc.store([q0, N0], tl.where(pixel[:, None], _rounded(n1 * tl.sigmoid(n1), io, INTERPRET), 0.0).to(io))

    _FINGERPRINT_0, _FINGERPRINT_1 = (tl.constexpr(m) for m in FINGERPRINT_MULTIPLIERS)

    @triton.jit
    def _fingerprint_kernel(rows_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[row, program] = this block's share of `fingerprints_reference` (the same int64 arithmetic)."""
        row, block = tl.program_id(1).to(tl.int64), tl.program_id(0)
        i = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        bits = tl.load(rows_ptr + row * n + i, mask=i < n, other=0).to(tl.int64)
        z = (i + 1) * _FINGERPRINT_0
        z = z ^ (z >> 29)
        z = z * _FINGERPRINT_1
        z = (z ^ (z >> 32)) | 1
        tl.store(out_ptr + row * tl.num_programs(0) + block, tl.sum(bits * z, axis=0))

# ---------------------------------------------------------------------------------------------------------------------
# Entry points: the kernel where Triton runs, else the reference


NORM_TILE, NORM_WARPS = 2048, 4
"""Values (pixels x channels) per program of the norm kernel, and its warps: 16 fp32 values a thread, so that a
thread needs few registers and an SM holds enough warps to hide the loads' latency (at 64 a thread the kernel
ran at a quarter of the memory bandwidth)."""


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(2), t.stride(3), t.stride(4), t.stride(1)


def _operands(src: Pending) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple, tuple]:
    res = src.res if src.res is not None else src.raw
    bias = src.bias if src.bias is not None else src.raw
    return src.raw, bias, res, _strides(src.raw), _strides(res)


FUSE_NORM_INTO_CONV = True
"""Whether `norm_silu` runs a pending `conv_gemm` with the norm in the conv's epilogue (`conv_gemm_norm_silu`): 1.11x
the whole decode on an H100 at 480p and 720p against the conv and the norm kernel apart (docs/benchmarks.md)."""


def norm_silu(src: Pending, gamma: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None, *, exact: bool,
              frames_per_call: int, plan: tuple[int, int, bool] | None = None) -> None:
    """y = SiLU(RMSNorm(src) * gamma), and x = src materialised if given; y and x are views of any strides.

    exact needs `plan` = (split, ctas, fma) for the Triton kernel (see `reduction_plan`). A pending `conv_gemm` runs
    with the norm in its epilogue (fast) where `FUSE_NORM_INTO_CONV`."""
    fuse = FUSE_NORM_INTO_CONV and src.conv is not None and not exact
    if fuse and conv_gemm_norm_silu(*src.conv, src.bias, src.res, gamma, y, x):
        return
    c = src.shape[1]
    if not triton_ready(src.raw):
        v = materialize_reference(src)
        if x is not None:
            x.copy_(v)
        y.copy_(norm_silu_reference(v, gamma, exact=exact, frames_per_call=frames_per_call))
        return
    _, _, t, h, w = src.shape
    n_pix = t * h * w
    c_pad = triton.next_power_of_2(c)
    block_p = max(1, NORM_TILE // c_pad)
    split, ctas, fma = plan if exact else (1, 1, True)
    raw, bias, res, rs, qs = _operands(src)
    _norm_silu_kernel[(triton.cdiv(n_pix, block_p),)](
        raw, bias, res, gamma, x if x is not None else y, y, n_pix, h, w, *rs, *qs,
        *_strides(x if x is not None else y), *_strides(y), float(c**0.5),
        C=c, C_PAD=c_pad, BLOCK_P=block_p, HAS_BIAS=src.bias is not None, HAS_RES=src.res is not None,
        STORE_X=x is not None, EXACT=exact, SPLIT=split, K=-(-c // (split * ctas)) if exact else 0, CTAS=ctas,
        FMA=fma, INTERPRET=_interpreting(), num_warps=NORM_WARPS)


def upsample(src: Pending, out: torch.Tensor, *, scale: int, interleave: bool) -> None:
    """Write `upsample_reference(src)` into the view `out` [1, C, T, H, W]."""
    if not triton_ready(src.raw):
        out.copy_(upsample_reference(src, scale=scale, interleave=interleave))
        return
    _, c, t, h, w = out.shape
    n_pix = t * h * w
    block_c = min(128, triton.next_power_of_2(c))
    block_p = max(1, 4096 // block_c)
    raw, bias, res, rs, qs = _operands(src)
    _upsample_kernel[(triton.cdiv(n_pix, block_p), triton.cdiv(c, block_c))](
        raw, bias, res, out, n_pix, h, w, c, *rs, *qs, *_strides(out),
        BLOCK_P=block_p, BLOCK_C=block_c, SCALE=scale, INTERLEAVE=interleave, HAS_BIAS=src.bias is not None,
        HAS_RES=src.res is not None, INTERPRET=_interpreting(), num_warps=4)


def dup_up(src: torch.Tensor, out: torch.Tensor, module: torch.nn.Module, *, first: bool) -> None:
    """Write diffusers' `DupUp3D` `module(src, first_chunk=first)` into `out` [1, C, F, H, W] (any strides)."""
    if not triton_ready(src):
        out.copy_(dup_up_reference(src, module, first=first))
        return
    _, c, f, h, w = out.shape
    n_pix = f * h * w
    block_c = min(128, triton.next_power_of_2(c))
    block_p = max(1, 4096 // block_c)
    _dup_up_kernel[(triton.cdiv(n_pix, block_p), triton.cdiv(c, block_c))](
        src, out, n_pix, h, w, c, *_strides(src), *_strides(out), BLOCK_P=block_p, BLOCK_C=block_c,
        FT=module.factor_t, FS=module.factor_s, REPEATS=module.repeats, SKIP=module.factor_t - 1 if first else 0,
        num_warps=4)


def to_uint8(src: Pending, out: torch.Tensor, *, patch: int) -> None:
    """Write the uint8 frames of the last conv's output into `out` [F, H', W', 3] (its top-left real region)."""
    # fp32 models take PyTorch's ops: on the H100 the kernel's fp32 arithmetic gave other levels in a few values
    # (not understood yet); bf16, the default, is bit for bit. Three channels: the kernel saves little there.
    if not triton_ready(src.raw) or src.bias is None or src.res is not None or src.raw.dtype == torch.float32:
        to_uint8_reference(src, out, patch=patch)
        return
    _, _, f, h, w = src.shape
    h, w = h * patch, w * patch
    n_pix = f * h * w
    block_p = 256
    _to_uint8_kernel[(triton.cdiv(n_pix, block_p),)](
        src.raw, src.bias, out, n_pix, h, w, *_strides(src.raw), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_P=block_p, PATCH=patch, INTERPRET=_interpreting(), num_warps=4)


FINGERPRINT_BLOCK = 4096


def fingerprints(t: torch.Tensor, per_call: int) -> torch.Tensor:
    """[calls] int64: the fingerprint (`fingerprints_reference`) of each `per_call` frames of t [1, C, F, H, W], any
    strides: the self-check compares the engine's conv outputs with diffusers' by them, one pass over each."""
    rows = fingerprint_rows(t, per_call)
    if not triton_ready(rows):
        return fingerprints_reference(rows)
    calls, n = rows.shape
    out = torch.empty((calls, triton.cdiv(n, FINGERPRINT_BLOCK)), dtype=torch.int64, device=rows.device)
    _fingerprint_kernel[(out.shape[1], calls)](rows, out, n, BLOCK=FINGERPRINT_BLOCK, num_warps=8)
    return out.sum(dim=1)


def tap_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3x3 conv's weight [Cout, Cin, 3, 3, 3] as `conv_by_taps`' [27 * Cout, Cin], rows in (dt, dy, dx, c) order."""
    return weight.permute(2, 3, 4, 0, 1).reshape(-1, weight.shape[1]).contiguous()


def conv_by_taps(window: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """A 3x3x3 conv with few output channels (the last conv: 3, or Wan 2.2's 12) over a channels-last window
    [1, Cin, T + 2, H + 2, W + 2] (its zero border in place): one GEMM of every window pixel by every tap's weights
    (`taps`: `tap_weights`; fp32 out), then each output pixel's 27 shifted taps summed (`_tap_sum_kernel`). cuDNN
    runs these convs as a GEMM 3 (or 12) wide, at a tenth of its speed on wider ones; the GEMM here is 81 (324) wide
    and reads the input once. -> [1, Cout, T, H, W] channels-last, no bias."""
    _, cin, tw, hw, ww = window.shape
    cout = taps.shape[0] // 27
    pixels = window.permute(0, 2, 3, 4, 1).reshape(-1, cin).t()  # [Cin, pixels]: a view of the channels-last window
    y = torch.mm(taps, pixels, out_dtype=torch.float32) if window.is_cuda else torch.mm(taps.float(), pixels.float())
    out = torch.empty((1, cout, tw - 2, hw - 2, ww - 2), dtype=window.dtype, device=window.device,
                      memory_format=torch.channels_last_3d)
    n_pix = out[0, 0].numel()
    block_p = 512
    _tap_sum_kernel[(triton.cdiv(n_pix, block_p),)](y, out, n_pix, hw - 2, ww - 2, y.shape[1], *_strides(out),
                                                     COUT=cout, BLOCK_P=block_p, num_warps=4)
    return out


CONV_TILES = {96: dict(BM=128, BK=32, num_warps=4, num_stages=4), 192: dict(BM=128, BK=32, num_warps=4, num_stages=5)}
"""`conv_gemm`'s tile by output channels: the fastest configs on the H200 (96 -> 96 at 480x832 and 720x1280, 192 ->
192 at 240x416, 8 frames: 1.20x, 1.20x and 1.17x cuDNN's tuned channels-last conv; docs/benchmarks.md)."""


def conv_gemm_ready(weight: torch.Tensor) -> bool:
    """Whether `conv_gemm` runs this 3x3 or 3x3x3 conv: its output channels have a tile, its input channels are
    whole blocks, 16-bit weights (fp32 would run as TF32), and a Hopper GPU (TMA; the only one measured) or the
    interpreter."""
    tile = CONV_TILES.get(weight.shape[0])
    return (tile is not None and weight.shape[1] % tile["BK"] == 0 and weight.shape[2:] in ((3, 3), (3, 3, 3))
            and weight.dtype in (torch.bfloat16, torch.float16) and triton_ready(weight)
            and (_interpreting() or torch.cuda.get_device_capability(weight.device)[0] == 9))


def gemm_weights(weight: torch.Tensor) -> torch.Tensor:
    """A conv's weight [Cout, Cin, (3,) 3, 3] as `conv_gemm`'s [taps * Cin, Cout], rows in (dt, dy, dx, c) order."""
    return weight.flatten(2).permute(2, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def conv_gemm_shape(window: torch.Tensor, weights: torch.Tensor) -> torch.Size:
    """The shape of `conv_gemm(window, weights)`: [1, Cout, T, H, W]."""
    _, cin, tw, hw, ww = window.shape
    return torch.Size((1, weights.shape[1], tw - 2 if weights.shape[0] == 27 * cin else tw, hw - 2, ww - 2))


def conv_gemm(window: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A 3x3x3 conv (or a 3x3 one per frame) over a channels-last window [1, Cin, T (+ 2), H + 2, W + 2] (its zero
    border in place), `weights` from `gemm_weights`: -> [1, Cout, T, H, W] channels-last, no bias.

    cuDNN's implicit GEMM runs the Wan decoder's 96- and 192-channel convs at 420-580 TFLOP/s on an H200; this one
    at 500-680. It computes every pixel of the padded grid (0.7 % more at 480p) and returns the interior as a view."""
    out = padded_grid(conv_gemm_shape(window, weights), window.dtype, window.device)
    _run_conv_gemm(window, weights, _grid_rows(out, window))
    return out


def conv_gemm_norm_silu(window: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor, res: torch.Tensor | None,
                        gamma: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None) -> bool:
    """`norm_silu(Pending(conv_gemm(window, weights), bias, res), gamma, y, x)` (fast) in one kernel, the norm in the
    conv's epilogue: the conv output never goes through memory. Needs y (the next conv's window interior), x and
    res laid out on the conv's padded grid (`padded_grid`); returns False, having done nothing, where they are not."""
    grids = [_grid_rows(t, window) for t in (y, x, res)]
    if any(g is None and t is not None for t, g in zip((y, x, res), grids, strict=True)):
        return False
    _run_conv_gemm(window, weights, *grids, bias=bias, gamma=gamma)
    return True


def padded_grid(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty channels-last [1, C, T, H, W] tensor laid out on a conv's padded grid (its rows H + 2 pixels apart,
    its frames (H + 2) x (W + 2)): the interior view of a bigger tensor, that `conv_gemm_norm_silu` stores into."""
    _, c, t, h, w = shape
    return torch.empty((1, c, t, h + 2, w + 2), dtype=dtype, device=device,
                       memory_format=torch.channels_last_3d)[..., :h, :w]


def _grid_rows(t: torch.Tensor | None, window: torch.Tensor) -> torch.Tensor | None:
    """[rows, C]: t's storage from its first pixel on, row q the q-th pixel of the padded grid of `window`'s frame
    size; None where t is not laid out so (or not given)."""
    if t is None:
        return None
    _, c, frames, hw, ww = t.shape[:3] + window.shape[3:]
    if t.stride()[1:] != (1, hw * ww * c, ww * c, c):
        return None
    rows = min(frames * hw * ww, (t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()) // c)
    return torch.as_strided(t, (rows, c), (c, 1), storage_offset=t.storage_offset())


def _run_conv_gemm(window: torch.Tensor, weights: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None,
                   res: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                   gamma: torch.Tensor | None = None) -> None:
    _, cin, tw, hw, ww = window.shape
    taps, cout = weights.shape[0] // cin, weights.shape[1]
    tile = CONV_TILES[cout]
    bm, bk = tile["BM"], tile["BK"]
    rows = tw * hw * ww
    pixels = window.permute(0, 2, 3, 4, 1).reshape(rows, cin)  # a view: a window is one channels-last tensor
    n0 = 1 << (cout.bit_length() - 1)  # 96 = 64 + 32, 192 = 128 + 64
    n1 = cout - n0

    def descs(t):
        return (TensorDescriptor(t, list(t.shape), [cout, 1], [bm, n0]),
                TensorDescriptor(t, list(t.shape), [cout, 1], [bm, n1]))

    y_descs = descs(y)  # (and the placeholder of x, res, bias and gamma where not given: the constexprs skip them)
    q = conv_gemm_shape(window, weights)[2] * hw * ww
    _conv_kernel[(triton.cdiv(q, bm),)](
        TensorDescriptor(pixels, [rows, cin], [cin, 1], [bm, bk]),
        TensorDescriptor(weights, list(weights.shape), [cout, 1], [bk, n0]),
        TensorDescriptor(weights, list(weights.shape), [cout, 1], [bk, n1]),
        *y_descs, *(y_descs if x is None else descs(x)), *(y_descs if res is None else descs(res)),
        weights if bias is None else bias, weights if gamma is None else gamma,
        hw * ww, ww, hw - 2, ww - 2, float(cout**0.5),
        C=cin, TAPS=taps, N0=n0, N1=n1, NORM=gamma is not None, HAS_RES=res is not None, STORE_X=x is not None,
        INTERPRET=_interpreting(), **tile)
