"""The decode engine on the CPU: its PyTorch reference path (the same windows, caches, chunking and fallbacks as on
GPUs) against diffusers' own `vae.decode`, and its Triton kernels under TRITON_INTERPRET=1 against their references."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaepipe.decode import to_uint8_frames
from vaepipe.engine import Engine, kernels

from conftest import tiny_vae

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the engine on the CPU through its reference ops: minutes on two cores


def _decode(engine: Engine, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([piece.video() for piece in engine.stream(z)], dim=2)


@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 2])
def test_exact_engine_equals_diffusers_decode_bit_for_bit(preset, dtype, chunk):
    vae = tiny_vae(preset, dtype)
    z = torch.randn(1, vae.config.z_dim, 4, 4, 6, generator=torch.Generator().manual_seed(chunk)).to(dtype)
    with torch.inference_mode():
        want = vae.decode(z).sample
    assert torch.equal(_decode(Engine(vae, exact=True, chunk=chunk), z), want)  # chunk 2: 1, a remainder of 1, then 2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_fast_engine_stays_within_rounding_of_diffusers(dtype, tolerance):
    vae = tiny_vae("random:wan2.1-tiny", dtype)
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.inference_mode():
        want = vae.decode(z).sample
    got = _decode(Engine(vae, exact=False, chunk=2), z)
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= tolerance


def _tiny_clip(preset: str, frames: int, *, seed: int):
    """A tiny bf16 VAE, latents of `frames` latent frames and diffusers' decode of them."""
    vae = tiny_vae(preset, torch.bfloat16)
    z = torch.randn(1, vae.config.z_dim, frames, 4, 6, generator=torch.Generator().manual_seed(seed))
    z = z.to(torch.bfloat16)
    with torch.inference_mode():
        return vae, z, vae.decode(z).sample


def _broken_norm_case(monkeypatch, *, seed: int):
    """A tiny clip (`_tiny_clip`); then every fused norm one ulp off: what a kernel summing in another order would
    do."""
    vae, z, want = _tiny_clip("random:wan2.1-tiny", 3, seed=seed)
    real = kernels.norm_silu

    def off_by_one_ulp(src, gamma, y, x=None, **kw):
        real(src, gamma, y, x, **kw)
        y.view(torch.int16).add_(1)

    monkeypatch.setattr(kernels, "norm_silu", off_by_one_ulp)
    return vae, z, want


def test_self_check_catches_a_broken_fused_op_and_falls_back_to_diffusers_op(monkeypatch):
    """Only the broken op falls back: the convs after it, whose fingerprints differed from diffusers' because their
    input did, are checked again op by op and keep the engine's way."""
    from vaepipe.engine.decoder import Conv

    monkeypatch.setattr(Conv, "_fast", lambda self, window, frames, per_call, way: self._reference(
        window, frames, per_call))  # (CPU convs give other bits channels-last)
    vae, z, want = _broken_norm_case(monkeypatch, seed=2)
    engine = Engine(vae, exact=True, chunk=2)
    assert torch.equal(_decode(engine, z), want)
    fused_norms = {name for name, m in vae.decoder.named_modules()
                   if type(m).__name__ == "WanRMS_norm" and "attentions" not in name}
    assert fused_norms and fused_norms == engine.fallbacks.keys()  # every one fell back to diffusers' op, no conv
    assert "other bits" in engine.fallbacks["norm_out"]
    fast = Engine(vae, exact=False, chunk=2)  # the fast policy trusts its kernels: no check, no fallback
    assert not torch.equal(_decode(fast, z), want) and not fast.fallbacks


def test_the_self_check_runs_ops_both_ways_only_where_the_clip_differs(monkeypatch):
    """Where the engine's way gives diffusers' clip, the check is one decode each way: no op runs twice. The convs'
    channels-last ways are stood in for by diffusers' calls (CPU convs give other bits channels-last)."""
    from vaepipe.engine.decoder import Context, Conv

    monkeypatch.setattr(Conv, "_fast", lambda self, window, frames, per_call, way: self._reference(
        window, frames, per_call))
    checking = []
    real_write = Context.write

    def spy(self, op, outputs, fast, reference):
        checking.append(self.checking)
        real_write(self, op, outputs, fast, reference)

    monkeypatch.setattr(Context, "write", spy)
    vae, z, want = _tiny_clip("random:wan2.2-tiny", 4, seed=4)
    engine = Engine(vae, exact=True, chunk=2)
    assert torch.equal(_decode(engine, z), want)
    assert checking and not any(checking) and not engine.fallbacks and engine.check_s > 0


def test_the_self_check_adds_only_diffusers_decode_of_the_clips_first_calls_once_per_call_shape(monkeypatch):
    """The check compares the clip's own first pieces with diffusers' decode of those latent frames: the engine
    decodes every latent frame once, diffusers' loop only the first 1 + k, and no diffusers conv call runs beside the
    engine's (the convs are compared by the fingerprints of diffusers' loop); a later clip checks only call shapes no
    check has seen (here a remainder call)."""
    import vaepipe.decode as decode_module
    from vaepipe.engine.decoder import Conv, Decoder

    real_reference, beside = Conv._reference, []
    monkeypatch.setattr(Conv, "_fast", lambda self, window, frames, per_call, way: real_reference(
        self, window, frames, per_call))  # (CPU convs give other bits channels-last)

    def spy_reference(self, window, frames, per_call):
        beside.append(frames > per_call)
        return real_reference(self, window, frames, per_call)

    monkeypatch.setattr(Conv, "_reference", spy_reference)
    calls, diffusers_frames = [], []
    real_call, real_stream = Decoder.__call__, decode_module.decode_stream

    def spy_call(self, latents, first):
        calls.append(latents.shape[2])
        return real_call(self, latents, first)

    def spy_stream(vae, z, **kwargs):
        for video in real_stream(vae, z, **kwargs):
            diffusers_frames.append(video.shape[2])
            yield video

    monkeypatch.setattr(Decoder, "__call__", spy_call)
    monkeypatch.setattr(decode_module, "decode_stream", spy_stream)
    vae, z, want = _tiny_clip("random:wan2.1-tiny", 5, seed=6)
    engine = Engine(vae, exact=True, chunk=2)
    for latent_frames, checked in ((5, 1 + 4 + 4), (5, 0), (4, 1 + 4)):  # the last: calls of 1, 1 (new), 2
        calls.clear(), diffusers_frames.clear()
        before = engine.check_s
        assert torch.equal(_decode(engine, z[:, :, :latent_frames]), want[:, :, : 1 + 4 * (latent_frames - 1)])
        assert sum(calls) == latent_frames and sum(diffusers_frames) == checked
        assert (engine.check_s > before) == (checked > 0)
    assert not engine.fallbacks and not any(beside)  # (one-frame 2-D convs run diffusers' call: no choice there)


def test_a_break_the_op_checks_miss_is_caught_by_the_whole_clip_check(monkeypatch):
    from vaepipe.engine.decoder import Context

    vae, z, want = _broken_norm_case(monkeypatch, seed=5)
    monkeypatch.setattr(Context, "write", lambda self, op, outputs, fast, reference: (
        reference if op.reference else fast)())  # op checks that compare nothing
    engine = Engine(vae, exact=True, chunk=2)
    assert torch.equal(_decode(engine, z), want)
    assert "every op" in engine.fallbacks


def test_a_conv_whose_multi_frame_call_differs_runs_per_call_channels_last(monkeypatch):
    """As on Wan 2.2 on the H200: where cuDNN's algorithm for a longer frame extent gives other bits, the self-check
    keeps the conv channels-last over diffusers' per-call extent (not diffusers' NCDHW call), and the video stays
    diffusers'. Here the channels-last ways are stood in for: per call they give diffusers' bits, over several calls'
    frames at once one ulp off."""
    from vaepipe.engine.decoder import Conv

    def fake_fast(self, window, frames, per_call, way):
        out = self._reference(window, frames, per_call)
        if not way.per_call and frames > per_call:
            out.raw.view(torch.int16).add_(1)
        return out

    monkeypatch.setattr(Conv, "_fast", fake_fast)
    vae, z, want = _tiny_clip("random:wan2.1-tiny", 4, seed=3)
    engine = Engine(vae, exact=True, chunk=2)
    assert torch.equal(_decode(engine, z), want)
    ways = [way for conv in engine.decoder.convs() if conv.module.kernel_size != (1, 1, 1)
            for (_, frames), way in conv.ways.items() if not (conv.two_d and frames == 1)]
    assert any(way.per_call for way in ways) and not any(way.diffusers for way in ways)
    assert all("conv_shortcut" in name for name in engine.fallbacks)  # (1x1x1 shortcuts are not stood in for)


def test_a_conv_way_checked_at_one_frame_size_is_checked_again_at_another(monkeypatch):
    """cuDNN picks its algorithm per shape: a way that gave diffusers' bits at one size proves nothing at another.
    Here the multi-frame channels-last way is one ulp off at the wider size only."""
    from vaepipe.engine.decoder import Conv

    def fake_fast(self, window, frames, per_call, way):
        out = self._reference(window, frames, per_call)
        if not way.per_call and frames > per_call and window.shape[-1] > 60:
            out.raw.view(torch.int16).add_(1)
        return out

    monkeypatch.setattr(Conv, "_fast", fake_fast)
    vae = tiny_vae("random:wan2.1-tiny", torch.bfloat16)
    engine = Engine(vae, exact=True, chunk=2)
    for w in (6, 8):  # full resolution 48, then 64 pixels wide
        z = torch.randn(1, 16, 3, 4, w, generator=torch.Generator().manual_seed(w)).to(torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(_decode(engine, z), vae.decode(z).sample)
    conv = engine.decoder.conv_out
    assert conv.ways[((32, 48), 8)].per_call is False and conv.ways[((32, 64), 8)].per_call is True
    assert "every op" not in engine.fallbacks


@pytest.mark.parametrize("diffusers_stream", [False, True])
def test_engine_pieces_write_the_uint8_frames_of_the_exact_video(diffusers_stream):
    """Also when the self-check hands the decode to diffusers' own stream (where that is faster than the engine)."""
    vae = tiny_vae("random:wan2.2-tiny", torch.float32)
    z = torch.randn(1, 48, 3, 3, 5, generator=torch.Generator().manual_seed(7))
    engine = Engine(vae, exact=True, chunk=2)
    engine.diffusers_stream = diffusers_stream
    with torch.inference_mode():
        whole = vae.decode(z).sample
        assert torch.equal(torch.cat([piece.video() for piece in engine.stream(z)], dim=2), whole)
        for piece in engine.stream(z):
            f, h, w = piece.shape[2:]
            got = torch.zeros((f, h + 1, w + 1, 3), dtype=torch.uint8)  # one extra row and column: padding
            want = torch.zeros_like(got)
            to_uint8_frames(piece, got)
            to_uint8_frames(piece.video(), want)
            assert torch.equal(got, want) and torch.equal(got[:, h], got[:, h - 1])


def test_chunk_follows_free_memory_and_stays_within_diffusers_peak():
    vae = tiny_vae("random:wan2.1-tiny", torch.float32)
    assert Engine(vae, exact=False).chunk_for(60, 104) == 2  # 4 + 48 frames fit the budget; 4 + 96 do not
    assert Engine(vae, exact=False, chunk=4).chunk_for(60, 104) == 4
    assert Engine(vae, exact=False).max_frames(60, 104) == 8


def test_reduction_plan_covers_the_shapes_pytorch_splits_across_blocks():
    assert kernels.reduction_plan(8, 30, sms=132) == (1, 1)  # few channels: one thread sums them all
    split, ctas = kernels.reduction_plan(96, 480 * 832, sms=132)
    assert split > 1 and ctas == 1
    split, ctas = kernels.reduction_plan(1024, 44 * 80, sms=132)  # wide and few pixels: several blocks per pixel
    assert ctas > 1 and -(-1024 // (split * ctas)) <= 256


@pytest.mark.skipif(kernels.triton is None, reason="needs triton (its CPU interpreter)")
def test_triton_kernels_under_the_interpreter_match_their_references():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "interpreted_kernels.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all kernel checks passed" in run.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fingerprint_follows_the_values_not_the_layout_and_tells_every_changed_call(dtype):
    t = torch.randn(1, 6, 4, 5, 7, generator=torch.Generator().manual_seed(8)).to(dtype)
    prints = kernels.fingerprints(t, 2)
    assert prints.shape == (2,) and prints[0] != prints[1]
    assert torch.equal(kernels.fingerprints(t.contiguous(memory_format=torch.channels_last_3d), 2), prints)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for index in ((0, 0, 0, 0, 0), (0, 5, 1, 4, 6), (0, 3, 2, 2, 3)):  # one value one ulp off: its call's print only
        off = t.clone()
        off.view(bits)[index].add_(1)
        changed = kernels.fingerprints(off, 2) != prints
        assert changed.tolist() == [index[2] < 2, index[2] >= 2]
    swapped = t.clone()
    swapped[0, 0, 0, 0, :2] = t[0, 0, 0, 0, :2].flip(0)  # the same values, two of them in each other's place
    assert not torch.equal(kernels.fingerprints(swapped, 2), prints)
