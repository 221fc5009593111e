"""The streamed decode is diffusers' own decode, bit for bit, and the uint8 conversion is diffusers' own too."""

import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor

from vaepipe.decode import decode_stream, to_uint8_frames

from conftest import tiny_vae


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_equals_whole_decode_bit_for_bit(preset, frames, dtype):
    vae = tiny_vae(preset, dtype)
    z = torch.randn(1, vae.config.z_dim, frames, 3, 5).to(dtype)  # odd latent height and width
    with torch.inference_mode():
        whole = vae.decode(z).sample
        pieces = list(decode_stream(vae, z))
    assert [p.shape[2] for p in pieces] == [1] + [4] * (frames - 1)
    streamed = torch.cat(pieces, dim=2)
    assert streamed.dtype == whole.dtype and streamed.shape == whole.shape
    assert torch.equal(streamed, whole)


def test_stream_leaves_the_models_own_cache_alone():
    vae = tiny_vae()
    z = torch.randn(1, 16, 3, 2, 2)
    with torch.inference_mode():
        reference = vae.decode(z).sample
        stream = decode_stream(vae, z)
        first = next(stream)
        vae.decode(z)  # a whole decode, which resets the model's own cache, between two pieces of the stream
        rest = list(stream)
    assert torch.equal(torch.cat([first, *rest], 2), reference)


def test_uint8_conversion_is_postprocess_video_byte_for_byte():
    video = torch.randn(1, 3, 5, 7, 9) * 0.7  # values beyond [-1, 1] exercise the clamp
    video[0, 0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1 / 255 - 1, 0.5 / 255 * 2 - 1])  # edges and a .5 rounding
    out = torch.empty(5, 7, 9, 3, dtype=torch.uint8)
    to_uint8_frames(video, out)
    frames = VideoProcessor().postprocess_video(video, output_type="pil")[0]
    assert np.array_equal(out.numpy(), np.stack([np.asarray(f) for f in frames]))


def test_padding_repeats_the_last_row_and_column():
    video = torch.rand(1, 3, 2, 5, 7) * 2 - 1
    exact = torch.empty(2, 5, 7, 3, dtype=torch.uint8)
    padded = torch.zeros(2, 6, 8, 3, dtype=torch.uint8)
    to_uint8_frames(video, exact)
    to_uint8_frames(video, padded)
    assert torch.equal(padded[:, :5, :7], exact)
    assert torch.equal(padded[:, :5, 7], exact[:, :, 6])
    assert torch.equal(padded[:, 5, :7], exact[:, 4])
    assert torch.equal(padded[:, 5, 7], exact[:, 4, 6])


def test_a_vae_class_vaepipe_does_not_know_decodes_whole_and_still_streams_in_order():
    from diffusers import AutoencoderKLHunyuanVideo

    class SomeFutureVae(AutoencoderKLHunyuanVideo):  # not in vaepipe/families: the generic whole-clip fallback
        pass

    torch.manual_seed(0)
    vae = SomeFutureVae(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=2,
                        layers_per_block=1).eval()
    z = torch.randn(1, 4, 6, 4, 6)
    with torch.inference_mode():
        pieces = list(decode_stream(vae, z))
        assert torch.equal(torch.cat(pieces, 2), vae.decode(z).sample)
    assert [p.shape[2] for p in pieces] == [1, 4, 4, 4, 4, 4]
