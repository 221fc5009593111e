"""Every streamed family on CUDA: full-size configs (the released architectures, random weights) give diffusers'
own decode bit for bit, and the stream's peak memory does not grow with the clip. Skipped without CUDA."""

import pytest
import torch

from vaepipe import families
from vaepipe.decode import decode_stream, to_uint8_frames
from vaepipe.families import family_of

from conftest import tiny_vae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _z(vae, frames: int, height: int, width: int, dtype) -> torch.Tensor:
    family = family_of(vae)
    s = family.spatial_factor(vae)
    return torch.randn(1, family.z_dim(vae), frames, height // s, width // s, device="cuda", dtype=dtype)


@pytest.mark.parametrize("preset", sorted(n for n in families.PRESETS if n.endswith("-tiny")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tiny_stream_equals_whole_decode(preset, dtype):
    vae = tiny_vae(preset, dtype, "cuda")
    kwargs = ({"temb": torch.tensor([0.05], device="cuda", dtype=dtype)}
              if vae.config.get("timestep_conditioning") else {})
    z = _z(vae, 9, 64, 96, dtype)
    with torch.inference_mode():
        assert torch.equal(torch.cat(list(decode_stream(vae, z, **kwargs)), 2), vae.decode(z, **kwargs).sample)


# Latent frames that take every path: HunyuanVideo 3 tiles with a ragged tail; CogVideoX an odd first batch;
# KVAE two segments.
@pytest.mark.parametrize(("preset", "frames", "size"), [("random:hunyuanvideo", 9, (240, 320)),
                                                        ("random:cogvideox", 13, (240, 360)),
                                                        ("random:kvae", 9, (240, 320))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_size_stream_equals_whole_decode_bit_for_bit(preset, frames, size, dtype):
    vae = tiny_vae(preset, dtype, "cuda")
    z = _z(vae, frames, *size, dtype)
    with torch.inference_mode():
        whole = vae.decode(z).sample
        streamed = torch.cat(list(decode_stream(vae, z)), 2)
    assert torch.equal(streamed, whole)


def _stream_peak(vae, z) -> int:
    """Peak CUDA memory of streaming `z` into one reused uint8 buffer, as the lanes do."""
    height, width = z.shape[3] * family_of(vae).spatial_factor(vae), z.shape[4] * family_of(vae).spatial_factor(vae)
    out = torch.empty(family_of(vae).temporal_factor(vae), height, width, 3, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for piece in decode_stream(vae, z):
            to_uint8_frames(piece, out)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.parametrize(("preset", "frames", "size"), [("random:hunyuanvideo", 16, (480, 848)),
                                                        ("random:cogvideox", 13, (480, 720)),
                                                        ("random:kvae", 9, (480, 832))])
def test_cuda_peak_memory_of_an_8x_longer_clip_stays_within_10_percent(preset, frames, size):
    vae = tiny_vae(preset, torch.bfloat16, "cuda")
    short = _stream_peak(vae, _z(vae, frames, *size, torch.bfloat16))
    long = _stream_peak(vae, _z(vae, 8 * frames, *size, torch.bfloat16))
    assert long <= 1.10 * short, f"{preset}: {long / 2**30:.2f} GiB vs {short / 2**30:.2f} GiB"
