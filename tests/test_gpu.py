"""The same exactness and stress specifications on CUDA, also under PyTorch's CUDA sanitizer (CSAN), which fails
on any cross-stream access that no event or synchronisation orders. Skipped without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe.cli import app
from vaepipe.decode import decode_stream
from vaepipe.pipeline import Buffers

from conftest import diffusers_frames, read_video, tiny_vae, write_latents
from lanes import decode_with_lanes, jitter, reference_frames

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
IN_SANITIZER = os.environ.get("TORCH_CUDA_SANITIZER") == "1"


@pytest.mark.parametrize("preset, latent_hw", [("random:wan2.1-tiny", (5, 7)), ("random:wan2.2-tiny", (5, 7)),
                                               ("random:wan2.1", (9, 13)), ("random:wan2.2", (5, 7))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stream_equals_whole_decode_bit_for_bit(preset, latent_hw, dtype):
    vae = tiny_vae(preset, dtype, "cuda")
    z = torch.randn(1, vae.config.z_dim, 5, *latent_hw, device="cuda", dtype=dtype)
    with torch.inference_mode():
        whole = vae.decode(z).sample
        streamed = torch.cat(list(decode_stream(vae, z)), dim=2)
    assert torch.equal(streamed, whole)


@pytest.fixture(scope="module")
def case():
    vae = tiny_vae("random:wan2.1-tiny", torch.float32, "cuda")
    z = torch.randn(1, 16, 9, 24, 32, device="cuda")
    return vae, z, reference_frames(vae, z)


@pytest.mark.parametrize("k, chunk", [(2, 1), (3, 2)])
def test_cuda_lanes_with_random_delays_give_the_reference_frames(case, k, chunk):
    vae, z, want = case
    buffers = Buffers()
    for seed in range(6 if IN_SANITIZER else 15):
        got, stats = decode_with_lanes(vae, z, buffers=buffers, delays=jitter(seed, 0.003), k=k, chunk=chunk)
        assert torch.equal(got, want), f"seed {seed}"
        assert buffers.host[0].is_pinned() and stats.busy_s["copy"] > 0


def test_cuda_sync_mode_gives_the_same_frames(case):
    vae, z, want = case
    got, _ = decode_with_lanes(vae, z, sync=True)
    assert torch.equal(got, want)


@pytest.mark.skipif(IN_SANITIZER, reason="runs the CLI in-process; covered outside the sanitizer")
def test_cli_on_cuda_matches_diffusers_on_cuda_byte_for_byte(tmp_path):
    z = write_latents(tmp_path / "lat.pt", (16, 4, 6, 10), seed=3)
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "o.mkv"), "--vae",
                                      "random:wan2.1-tiny", "--device", "cuda", "--dtype", "fp32", "--codec", "ffv1",
                                      "--pix-fmt", "rgb24", "--exact", "-q"])
    assert result.exit_code == 0, result.output
    want = diffusers_frames(tiny_vae("random:wan2.1-tiny", torch.float32, "cuda"), z[None])
    assert np.array_equal(read_video(tmp_path / "o.mkv"), want)


def _sanitized(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(IN_SANITIZER, reason="this test starts the sanitized run")
def test_the_sanitizer_catches_an_unsynchronised_stream():
    """Control: the sanitizer is really on, so the next test can fail."""
    racy = ("import torch\nx = torch.zeros(1 << 20, device='cuda')\ns = torch.cuda.Stream()\n"
            "with torch.cuda.stream(s):\n    x.add_(1)\nprint(x.sum())\n")
    run = _sanitized(["-c", racy])
    assert run.returncode != 0 and "CSAN" in run.stderr


@pytest.mark.skipif(IN_SANITIZER, reason="this test starts the sanitized run")
def test_lanes_pass_under_the_cuda_sanitizer():
    run = _sanitized(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k",
                      "random_delays or sync_mode"])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


@pytest.fixture(scope="module")
def full_size():
    """Full-size random-weight Wan VAEs (bf16 and fp32) and short clips at their real resolutions."""
    vaes = {(preset, dtype): tiny_vae(preset, dtype, "cuda") for preset in ("random:wan2.1", "random:wan2.2")
            for dtype in (torch.bfloat16, torch.float32)}
    latent = {"random:wan2.1": (60, 104), "random:wan2.2": (44, 80)}  # 480x832 and 704x1280
    return vaes, latent


def _engine_video(engine, z):
    with torch.inference_mode():
        return torch.cat([piece.video() for piece in engine.stream(z)], dim=2)


@pytest.mark.parametrize("preset", ["random:wan2.1", "random:wan2.2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [None, 2])
def test_cuda_exact_engine_equals_diffusers_decode_bit_for_bit(full_size, preset, dtype, chunk):
    from vaepipe.engine import Engine

    vaes, latent = full_size
    vae = vaes[(preset, dtype)]
    z = torch.randn(1, vae.config.z_dim, 4, *latent[preset], device="cuda", dtype=dtype)
    with torch.inference_mode():
        want = vae.decode(z).sample
    engine = Engine(vae, exact=True, chunk=chunk)
    assert torch.equal(_engine_video(engine, z), want), engine.fallbacks
    fast = Engine(vae, exact=False, chunk=chunk)
    assert (_engine_video(fast, z).float() - want.float()).abs().max() <= (0.1 if dtype == torch.bfloat16 else 1e-2)


def test_cuda_fast_engine_needs_no_more_memory_than_diffusers_whole_decode(full_size):
    """The engine's bound (FRAMES_BUDGET): 81 frames at 480x832, bf16, the default policy with its pending convs and
    fused norms, peaks below diffusers' own decode of the clip (above the weights and latents in both)."""
    from vaepipe.bench.decoders import _engine_lane
    from vaepipe.engine import Engine

    vaes, latent = full_size
    vae = vaes[("random:wan2.1", torch.bfloat16)]
    z = torch.randn(1, vae.config.z_dim, 21, *latent["random:wan2.1"], device="cuda", dtype=torch.bfloat16)
    engine = Engine(vae, exact=False)

    def peak(run):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(lambda: _engine_lane(engine, z))  # buffers and kernels of the first call
    assert peak(lambda: _engine_lane(engine, z)) <= peak(lambda: vae.decode(z).sample)


@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_exact_engine_equals_diffusers_on_tiny_configs(preset, dtype):
    """The tiny VAEs are narrower than the engine's verified width: their exact decode runs every op diffusers' way
    (they passed the op checks and still gave other bits on the H200 before that)."""
    from vaepipe.engine import Engine

    vae = tiny_vae(preset, dtype, "cuda")
    for hw in ((5, 7), (6, 10), (24, 32)):
        z = torch.randn(1, vae.config.z_dim, 5, *hw, device="cuda", dtype=dtype)
        with torch.inference_mode():
            want = vae.decode(z).sample
        for chunk in (1, None):
            engine = Engine(vae, exact=True, chunk=chunk)
            assert torch.equal(_engine_video(engine, z), want), (hw, chunk, engine.fallbacks)


def test_cuda_self_check_catches_a_broken_kernel_and_stays_exact(full_size, monkeypatch):
    from vaepipe.engine import Engine, kernels

    vae = full_size[0][("random:wan2.1", torch.bfloat16)]
    z = torch.randn(1, 16, 3, 30, 52, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want = vae.decode(z).sample
    real = kernels.norm_silu

    def off_by_one_ulp(src, gamma, y, x=None, **kw):
        real(src, gamma, y, x, **kw)
        y.view(torch.int16).add_(1)

    monkeypatch.setattr(kernels, "norm_silu", off_by_one_ulp)
    engine = Engine(vae, exact=True)
    assert torch.equal(_engine_video(engine, z), want)
    assert "norm_out" in engine.fallbacks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_move_data_bit_for_bit_and_the_exact_norm_repeats_diffusers(dtype):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from vaepipe.engine import kernels
    from vaepipe.engine.kernels import Pending

    def cl(*shape):
        return torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last_3d)

    for interleave in (True, False):
        c = 192
        src = Pending(cl(1, 2 * c if interleave else c, 2, 30, 52), torch.randn(2 * c if interleave else c,
                                                                              device="cuda").to(dtype))
        want = kernels.upsample_reference(src, scale=2, interleave=interleave)
        out = torch.empty_like(want, memory_format=torch.channels_last_3d)
        kernels.upsample(src, out, scale=2, interleave=interleave)
        assert torch.equal(out, want)
    from diffusers.models.autoencoders.autoencoder_kl_wan import DupUp3D

    for c_in, c_out, factor_t, h, w in ((1024, 1024, 2, 44, 80), (1024, 512, 1, 176, 320)):  # Wan 2.2's shortcuts
        module = DupUp3D(c_in, c_out, factor_t=factor_t, factor_s=2)
        src = cl(1, c_in, 2, h, w)
        for first in (True, False):
            want = module(src.contiguous(), first_chunk=first)
            out = torch.empty_like(want, memory_format=torch.channels_last_3d)
            kernels.dup_up(src, out, module, first=first)
            assert torch.equal(out, want)
    for patch in (1, 2) if dtype == torch.bfloat16 else ():  # fp32 takes PyTorch's ops (kernels.to_uint8)
        src = Pending(cl(1, 3 * patch * patch, 3, 40, 52), torch.randn(3 * patch * patch, device="cuda").to(dtype))
        got = torch.zeros((3, 40 * patch, 52 * patch, 3), dtype=torch.uint8, device="cuda")
        want = got.clone()
        kernels.to_uint8(src, got, patch=patch)
        kernels.to_uint8_reference(src, want, patch=patch)
        assert torch.equal(got, want)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # Wan 2.1's norms at 480p, Wan 2.2's wide ones at 704x1280 (PyTorch splits a 1024-channel sum over several
    # blocks where the pixels are few), and pixel counts that are not a multiple of 4.
    for c, frames, h, w in ((96, 4, 120, 208), (192, 4, 60, 104), (384, 2, 60, 104), (384, 1, 60, 104),
                            (1024, 1, 44, 80), (1024, 2, 88, 160), (1024, 4, 176, 320), (512, 4, 176, 320),
                            (96, 1, 5, 7), (96, 1, 6, 7)):
        norm = WanRMS_norm(c, images=False).to("cuda", dtype)
        with torch.no_grad():
            norm.gamma.uniform_(0.2, 3.0)  # trained-like scales
        src = Pending(cl(1, c, frames, h, w), torch.randn(c, device="cuda").to(dtype), cl(1, c, frames, h, w))
        x = kernels.materialize_reference(src)
        want = torch.nn.functional.silu(norm(x.contiguous()))  # diffusers' ops, on diffusers' layout
        y = torch.empty_like(x)
        plan = kernels.reduction_plan(c, frames * h * w, sms=sms) + (True,)
        kernels.norm_silu(src, norm.gamma.detach().reshape(-1), y, exact=True, frames_per_call=frames, plan=plan)
        assert torch.equal(y, want), (c, frames)
    for cin, cout, h, w in ((96, 3, 62, 106), (256, 12, 46, 82)):  # the fast policy's last conv, Wan 2.1 and 2.2
        window, weight = cl(1, cin, 6, h, w), torch.randn(cout, cin, 3, 3, 3, device="cuda").to(dtype) / cin
        got = kernels.conv_by_taps(window, kernels.tap_weights(weight))
        want = torch.nn.functional.conv3d(window.double(), weight.double())
        assert ((got.double() - want).abs() <= want.abs() / 128 + 1e-5).all()  # within the output's rounding
    # the fast policy's 96- and 192-channel convs (Hopper): Wan 2.1's at 480p, a narrower input, the upsamplers' 3x3
    for cin, cout, frames, h, w in ((96, 96, 10, 482, 834), (192, 192, 10, 242, 418), (384, 192, 6, 62, 106),
                                    (192, 96, 4, 62, 106)):
        weight = torch.randn(cout, cin, *(3,) * (3 if frames > 4 else 2), device="cuda").to(dtype) / cin ** 0.5
        if not kernels.conv_gemm_ready(weight):
            break
        window = cl(1, cin, frames, h, w)
        got = kernels.conv_gemm(window, kernels.gemm_weights(weight))
        if weight.dim() == 5:
            want = torch.nn.functional.conv3d(window.double(), weight.double())
        else:
            want = torch.nn.functional.conv2d(window[0].transpose(0, 1).double(), weight.double()).transpose(0, 1)[None]
        assert got.shape == want.shape and ((got.double() - want).abs() <= want.abs() / 128 + 1e-3).all(), (cin, cout)
        # the same conv with the next norm in its epilogue, into the interior of a window (the border left alone)
        bias, gamma = torch.randn(cout, device="cuda").to(dtype), torch.rand(cout, device="cuda").to(dtype) + 0.5
        res = kernels.padded_grid(got.shape, dtype, "cuda").copy_(cl(*got.shape)) if weight.dim() == 5 else None
        want_x, want_y = torch.empty_like(got), torch.empty_like(got)
        kernels.norm_silu(Pending(got, bias, res), gamma, want_y, want_x, exact=False, frames_per_call=1)
        y_window = torch.zeros((1, cout, frames, h, w), device="cuda", dtype=dtype)
        y_window = y_window.contiguous(memory_format=torch.channels_last_3d)
        cached = frames - got.shape[2]
        y_window[:, :, :cached] = 7.0  # the cached frames: not the conv's to write
        y, x = y_window[:, :, cached:, 1:-1, 1:-1], kernels.padded_grid(got.shape, dtype, "cuda")
        assert kernels.conv_gemm_norm_silu(window, kernels.gemm_weights(weight), bias, res, gamma, y, x)
        assert torch.equal(x, want_x), (cin, cout)
        assert ((y.float() - want_y.float()).abs() <= want_y.float().abs() / 128 + 1e-3).all(), (cin, cout)
        y.zero_()
        assert (y_window[:, :, cached:] == 0).all() and (y_window[:, :, :cached] == 7).all(), (cin, cout)
    t = cl(1, 96, 8, 120, 208)  # the self-check's fingerprints: 4 frames a row, sums that wrap around 2**64
    for layout in (t, t.contiguous()):
        assert torch.equal(kernels.fingerprints(layout, 4), kernels.fingerprints_reference(kernels.fingerprint_rows(
            t, 4)))


def test_cli_on_cuda_default_engine_exact_and_diffusers_decoder(tmp_path):
    z = write_latents(tmp_path / "lat.pt", (16, 4, 6, 10), seed=4)
    want = diffusers_frames(tiny_vae("random:wan2.1-tiny", torch.float32, "cuda"), z[None])
    base = ["decode", str(tmp_path / "lat.pt"), "--vae", "random:wan2.1-tiny", "--device", "cuda", "--dtype", "fp32",
            "--codec", "ffv1", "--pix-fmt", "rgb24", "-q"]
    for name, flags in {"exact": ["--exact"], "diffusers": ["--no-engine"], "fast": []}.items():
        result = CliRunner().invoke(app, [*base[:2], str(tmp_path / f"{name}.mkv"), *base[2:], *flags])
        assert result.exit_code == 0, result.output
    assert np.array_equal(read_video(tmp_path / "exact.mkv"), want)
    assert np.array_equal(read_video(tmp_path / "diffusers.mkv"), want)
    assert np.abs(read_video(tmp_path / "fast.mkv").astype(int) - want.astype(int)).max() <= 2
