"""Run by test_engine.py with TRITON_INTERPRET=1: the Triton kernels on CPU tensors against their references.

Data movement is compared bit for bit; the exact norm's order of summation is compared bit for bit against a plain
float32 emulation of PyTorch's CUDA reduction order (`reduction_plan`) in the same arithmetic the interpreter uses."""

import os

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
from vaepipe.engine import kernels  # noqa: E402
from vaepipe.engine.kernels import Pending  # noqa: E402

gen = torch.Generator().manual_seed(0)


def channels_last(*shape, dtype=torch.bfloat16, scale=1.0):
    t = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last_3d)


def check_upsample():
    for dtype in (torch.float32, torch.bfloat16):
        for interleave, scale in ((True, 2), (False, 2), (False, 1)):
            c = 12
            src = Pending(channels_last(1, 2 * c if interleave else c, 3, 4, 5, dtype=dtype),
                          torch.randn(2 * c if interleave else c, generator=gen).to(dtype),
                          channels_last(1, 2 * c if interleave else c, 3, 4, 5, dtype=dtype))
            want = kernels.upsample_reference(src, scale=scale, interleave=interleave)
            window = torch.zeros((1, c, want.shape[2], want.shape[3] + 2, want.shape[4] + 2), dtype=dtype)
            out = window.contiguous(memory_format=torch.channels_last_3d)[:, :, :, 1:-1, 1:-1]
            kernels.upsample(src, out, scale=scale, interleave=interleave)
            assert torch.equal(out, want), (dtype, interleave, scale)


def check_dup_up():
    from diffusers.models.autoencoders.autoencoder_kl_wan import DupUp3D

    for c_in, c_out, factor_t in ((8, 8, 2), (8, 4, 1), (6, 12, 2)):  # Wan 2.2's: (1024, 1024, 2), (1024, 512, 1)
        module = DupUp3D(c_in, c_out, factor_t=factor_t, factor_s=2)
        src = channels_last(1, c_in, 3, 4, 5)
        for first in (True, False):
            want = module(src.contiguous(), first_chunk=first)
            window = torch.zeros((1, c_out, want.shape[2], want.shape[3] + 2, want.shape[4] + 2), dtype=src.dtype)
            out = window.contiguous(memory_format=torch.channels_last_3d)[:, :, :, 1:-1, 1:-1]
            kernels.dup_up(src, out, module, first=first)
            assert torch.equal(out, want), (c_in, c_out, factor_t, first)


def check_to_uint8():
    for dtype in (torch.float32, torch.bfloat16):
        for patch in (1, 2):
            src = Pending(channels_last(1, 3 * patch * patch, 2, 3, 5, dtype=dtype, scale=0.8),
                          torch.randn(3 * patch * patch, generator=gen).to(dtype) * 0.1)
            got = torch.zeros((2, 3 * patch + 1, 5 * patch + 1, 3), dtype=torch.uint8)
            want = got.clone()
            kernels.to_uint8(src, got, patch=patch)
            kernels.to_uint8_reference(src, want, patch=patch)
            assert torch.equal(got, want), (dtype, patch)


def emulated_exact_norm_silu(x: np.ndarray, gamma: np.ndarray, split: int, ctas: int) -> np.ndarray:
    """The exact policy's arithmetic in plain float32: PyTorch's CUDA order of the sum of squares (unfused
    multiply-add), then diffusers' steps for an fp32 model."""
    pixels, c = x.shape
    k_max = -(-c // (split * ctas))
    partial = np.zeros((ctas, split, pixels), np.float32)
    for g in range(ctas):
        for y in range(split):
            acc = np.zeros((4, pixels), np.float32)
            for k in range(k_max):
                ch = k * ctas * split + g * split + y
                if ch < c:
                    acc[k % 4] = acc[k % 4] + x[:, ch] * x[:, ch]
            partial[g, y] = ((acc[0] + acc[1]) + acc[2]) + acc[3]

    def halving(v):  # v[y] += v[y + n/2]
        while len(v) > 1:
            half = len(v) // 2
            v = [v[i] + v[i + half] for i in range(half)]
        return v[0]

    per_cta = [halving(list(partial[g])) for g in range(ctas)]
    gathered = [np.zeros(pixels, np.float32) for _ in range(split)]
    for g in range(ctas):
        gathered[g % split] = gathered[g % split] + per_cta[g]
    ss = halving(gathered)
    n = x / np.maximum(np.sqrt(ss), np.float32(1e-12))[:, None]
    n = (n * np.float32(c**0.5)) * gamma[None, :] + np.float32(0.0)
    return n / (np.float32(1.0) + np.exp(-n))


def check_exact_norm_order():
    for c, split, ctas in ((24, 4, 1), (40, 4, 3), (20, 2, 4), (12, 1, 1)):
        raw = channels_last(1, c, 2, 3, 4, dtype=torch.float32)
        gamma = torch.rand(c, generator=gen) + 0.5
        y = torch.empty_like(raw)
        kernels.norm_silu(Pending(raw), gamma, y, exact=True, frames_per_call=2, plan=(split, ctas, False))
        pixels = raw.permute(0, 2, 3, 4, 1).reshape(-1, c).numpy()
        want = emulated_exact_norm_silu(pixels, gamma.numpy(), split, ctas)
        got = y.permute(0, 2, 3, 4, 1).reshape(-1, c).numpy()
        assert np.array_equal(got, want), (c, split, ctas, np.abs(got - want).max())


def check_norm_against_diffusers_ops():
    for dtype in (torch.float32, torch.bfloat16):
        c = 24
        src = Pending(channels_last(1, c, 2, 3, 4, dtype=dtype), torch.randn(c, generator=gen).to(dtype),
                      channels_last(1, c, 2, 3, 4, dtype=dtype))
        gamma = (torch.rand(c, generator=gen) + 0.5).to(dtype)
        x = torch.empty_like(src.raw)
        v = kernels.materialize_reference(src)
        for exact in (True, False):
            y = torch.empty_like(src.raw)
            plan = kernels.reduction_plan(c, 2 * 3 * 4, sms=132) + (True,)
            kernels.norm_silu(src, gamma, y, x, exact=exact, frames_per_call=2, plan=plan)
            assert torch.equal(x, v)  # the materialised input: data movement after diffusers' two adds
            want = kernels.norm_silu_reference(v, gamma, exact=exact, frames_per_call=2)
            assert (y.float() - want.float()).abs().max() <= (0.02 if dtype == torch.bfloat16 else 1e-5)


def check_fingerprints():
    for dtype in (torch.float32, torch.bfloat16):
        t = channels_last(1, 8, 4, 20, 30, dtype=dtype)  # rows of 2 x 4,800 values: two blocks, the last partial
        want = kernels.fingerprints_reference(kernels.fingerprint_rows(t, 2))
        assert torch.equal(kernels.fingerprints(t, 2), want), dtype
        assert torch.equal(kernels.fingerprints(t.contiguous(), 2), want), dtype  # the layout does not count


def check_conv_by_taps():
    for cout in (3, 12):
        window = channels_last(1, 8, 2 + 3, 6, 7, dtype=torch.float32)
        weight = torch.randn(cout, 8, 3, 3, 3, generator=gen)
        got = kernels.conv_by_taps(window, kernels.tap_weights(weight))
        want = torch.nn.functional.conv3d(window, weight)
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4, cout


def check_conv_gemm():
    for cout, taps in ((96, 27), (192, 27), (96, 9)):  # 3x3x3 convs and the upsamplers' per-frame 3x3 one
        window = channels_last(1, 64, 4, 5, 6, dtype=torch.float32)
        weight = torch.randn(cout, 64, *(3,) * (3 if taps == 27 else 2), generator=gen)
        got = kernels.conv_gemm(window, kernels.gemm_weights(weight))
        if taps == 27:
            want = torch.nn.functional.conv3d(window, weight)
        else:
            want = torch.nn.functional.conv2d(window[0].transpose(0, 1), weight).transpose(0, 1)[None]
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-3, (cout, taps)


def check_conv_with_norm_fused():
    """The conv's epilogue writes `norm_silu` of conv + bias (+ res) into the next window's interior, and x if asked;
    nothing but zeros outside the interior (the border rows of the padded grid are not pixels), nothing into the
    cached frames; tensors not on the padded grid are refused."""
    for cout, taps, with_res, store_x in ((96, 27, True, True), (192, 27, False, False), (96, 9, False, True)):
        window = channels_last(1, 32, 4, 5, 6, dtype=torch.float32)
        weights = kernels.gemm_weights(torch.randn(cout, 32, *(3,) * (3 if taps == 27 else 2), generator=gen) * 0.1)
        shape = kernels.conv_gemm_shape(window, weights)
        bias, gamma = torch.randn(cout, generator=gen), torch.rand(cout, generator=gen) + 0.5
        res = None
        if with_res:  # its border rows hold NaN: not pixels, they must not reach the next window's border
            res = kernels.padded_grid(shape, torch.float32, "cpu")
            res.as_strided((res.untyped_storage().nbytes() // 4,), (1,), 0).fill_(float("nan"))
            res.copy_(torch.randn(shape, generator=gen))
        src = Pending(kernels.conv_gemm(window, weights), bias, res)
        want_x = kernels.materialize_reference(src)
        want_y = kernels.norm_silu_reference(want_x, gamma, exact=False, frames_per_call=1)
        y_window = torch.zeros(shape[:2] + (shape[2] + 2, shape[3] + 2, shape[4] + 2))
        y_window = y_window.contiguous(memory_format=torch.channels_last_3d)
        y_window[:, :, :2] = 7.0  # the cached frames: not the conv's to write
        y = y_window[:, :, 2:, 1:-1, 1:-1]
        x = kernels.padded_grid(shape, torch.float32, "cpu") if store_x else None
        assert not kernels.conv_gemm_norm_silu(window, weights, bias, res, gamma, torch.empty_like(y), x)
        assert kernels.conv_gemm_norm_silu(window, weights, bias, res, gamma, y, x)
        assert (y - want_y).abs().max() <= 1e-4, (cout, taps)
        if store_x:
            assert (x - want_x).abs().max() <= 1e-4, (cout, taps)
        y.zero_()  # the border stays zero (the grid's border rows store zeros there), the cached frames as they were
        assert (y_window[:, :, 2:] == 0).all() and (y_window[:, :, :2] == 7.0).all(), (cout, taps)


def check_engine_with_conv_gemm():
    """The whole fast engine with its 96- and 192-channel convs run by `conv_gemm`, the norm fused into their
    epilogues and not, against diffusers' decode: the wiring (pending convs, outputs landing on the next window's
    padded grid, residuals, cached frames) and not only the kernel. fp32 (the interpreter's TMA mishandles bf16, so
    `conv_gemm_ready`'s dtype gate is lifted here); full-size Wan 2.1 channels, 2 x 2 x 2 latents."""
    from vaepipe.engine import Engine
    from vaepipe.vae import load_vae

    vae = load_vae("random:wan2.1", dtype=torch.float32, device=torch.device("cpu")).model
    z = torch.randn((1, 16, 2, 2, 2), generator=gen)
    kernels.conv_gemm_ready = lambda w: w.shape[0] in kernels.CONV_TILES and w.shape[2:] in ((3, 3), (3, 3, 3))
    run_conv_gemm, fused = kernels._run_conv_gemm, []
    kernels._run_conv_gemm = lambda *a, **k: fused.append(k.get("gamma") is not None) or run_conv_gemm(*a, **k)
    with torch.inference_mode():
        want = vae.decode(z).sample
        for fuse in (False, True):
            kernels.FUSE_NORM_INTO_CONV, fused[:] = fuse, []
            got = torch.cat([part.video() for part in Engine(vae, exact=False).stream(z)], 2)
            assert len(fused) == 30 and sum(fused) == (28 if fuse else 0), (fuse, fused)
            assert (got - want).abs().max() <= 1e-4, fuse


if __name__ == "__main__":
    check_upsample()
    check_dup_up()
    check_to_uint8()
    check_exact_norm_order()
    check_norm_against_diffusers_ops()
    check_fingerprints()
    check_conv_by_taps()
    check_conv_gemm()
    check_conv_with_norm_fused()
    check_engine_with_conv_gemm()
    print("all kernel checks passed")
