"""Every diffusers video VAE family: the stream is diffusers' own decode bit for bit, frames leave as soon as they
are final, and each family's latent transform is its pipeline's."""

import pytest
import torch

from vaepipe import families
from vaepipe.decode import decode_stream
from vaepipe.errors import BadInput
from vaepipe.families import DecodeSettings, family_of

from conftest import tiny_vae

TINY = sorted(name for name in families.PRESETS if name.endswith("-tiny") and not name.startswith("random:wan"))
# Latent frame counts that reach every branch: HunyuanVideo's single tile (<= 4) and several tiles with a ragged
# tail (9); CogVideoX's even batches and an odd first one; KVAE's and Kandinsky's two segments, the last of one frame.
# The families decoded whole need one count: their stream is the whole decode.
FRAMES = {"hunyuanvideo": (4, 9), "cogvideox": (2, 5), "kvae": (6,), "kandinsky6-sr": (6,)}


def decode_kwargs(vae, dtype) -> dict:
    return {"temb": torch.tensor([0.05], dtype=dtype)} if vae.config.get("timestep_conditioning") else {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", TINY)
def test_stream_equals_whole_decode_bit_for_bit(preset, dtype):
    vae = tiny_vae(preset, dtype)
    family = family_of(vae)
    for frames in FRAMES.get(family.name, (2,)):
        torch.manual_seed(frames)
        z = torch.randn(1, family.z_dim(vae), frames, 2, 3).to(dtype)
        kwargs = decode_kwargs(vae, dtype)
        with torch.inference_mode():
            whole = vae.decode(z, **kwargs).sample
            pieces = list(decode_stream(vae, z, **kwargs))
        streamed = torch.cat(pieces, dim=2)
        assert streamed.dtype == whole.dtype and streamed.shape == whole.shape, (preset, frames)
        assert torch.equal(streamed, whole), (preset, frames)
        assert whole.shape[2] == family.num_frames(vae, frames), (preset, frames)
        assert max(p.shape[2] for p in pieces) <= family.temporal_factor(vae)


class CountingDecoder(torch.nn.Module):
    """Wraps a VAE's decoder and counts its calls, to see when the stream hands frames on."""

    def __init__(self, decoder):
        super().__init__()
        self.inner, self.calls = decoder, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize(("preset", "frames", "calls"), [("random:hunyuanvideo-tiny", 12, 4),
                                                         ("random:cogvideox-tiny", 9, 4),
                                                         ("random:kvae-tiny", 9, 2)])
def test_frames_leave_after_the_first_decoder_call(preset, frames, calls):
    vae = tiny_vae(preset)
    counter = vae.decoder = CountingDecoder(vae.decoder)
    z = torch.randn(1, family_of(vae).z_dim(vae), frames, 2, 2)
    with torch.inference_mode():
        stream = decode_stream(vae, z)
        next(stream)
        assert counter.calls == 1  # the first frame is out before the rest of the clip is decoded
        list(stream)
    assert counter.calls == calls


def test_tile_stream_holds_back_only_the_blend():
    """Between tiles the stream keeps the next blend's frames, not tiles: memory is one tile, whatever the length."""
    vae = tiny_vae("random:hunyuanvideo-tiny")
    blend = vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames
    z = torch.randn(1, 16, 15, 2, 2)
    seen = []
    real_blend = vae.blend_t

    def spy(a, b, extent):
        seen.append(a.shape[2])
        return real_blend(a, b, extent)

    vae.blend_t = spy
    with torch.inference_mode():
        list(decode_stream(vae, z))
    assert seen and set(seen) == {blend}


@pytest.mark.parametrize("preset", ["random:hunyuanvideo-tiny", "random:cogvideox-tiny"])
def test_two_streams_share_one_model(preset):
    vae = tiny_vae(preset)
    channels = family_of(vae).z_dim(vae)
    za, zb = torch.randn(1, channels, 9, 2, 2), torch.randn(1, channels, 6, 2, 2)
    with torch.inference_mode():
        ref_a, ref_b = vae.decode(za).sample, vae.decode(zb).sample
        a, b = decode_stream(vae, za), decode_stream(vae, zb)
        out_a, out_b = [next(a)], [next(b)]
        for piece in b:  # b runs to its end between a's first and second pieces
            out_b.append(piece)
        out_a += list(a)
    assert torch.equal(torch.cat(out_a, 2), ref_a) and torch.equal(torch.cat(out_b, 2), ref_b)


@pytest.mark.parametrize("preset", ["random:ltx-tiny", "random:ltx2-tiny"])
def test_ltx_with_framewise_decoding_streams_its_tiles(preset):
    vae = tiny_vae(preset)
    vae.use_framewise_decoding = True  # a library user's switch: diffusers then decodes blended temporal tiles
    vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = 16, 8
    family = family_of(vae)
    assert family.streams_for(vae) == "tiles"
    z = torch.randn(1, 8, 7, 2, 2)
    kwargs = decode_kwargs(vae, torch.float32)
    with torch.inference_mode():
        whole = vae.decode(z, **kwargs).sample
        assert torch.equal(torch.cat(list(decode_stream(vae, z, **kwargs)), 2), whole)


def test_ltx_latents_take_the_pipelines_denormalisation_and_decode_timestep():
    from diffusers import LTXPipeline

    vae = tiny_vae("random:ltx-tiny")
    vae.latents_mean.normal_()  # trained VAEs have real statistics; random ones are 0 and 1
    vae.latents_std.uniform_(0.5, 2.0)
    latents = torch.randn(1, 8, 2, 2, 3)
    ltx = family_of(vae)
    z, kwargs = ltx.prepare(vae, latents, denormalize=True, settings=DecodeSettings())
    expected = LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert torch.equal(z, expected)
    assert torch.equal(kwargs["temb"], torch.tensor([0.0]))  # the pipeline's default decode_timestep
    # decode_noise_scale defaults to the timestep: (1 - s) * latents + s * noise after denormalising, as the pipeline.
    z, kwargs = ltx.prepare(vae, latents, denormalize=True, settings=DecodeSettings(timestep=0.05, noise_seed=3))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.05])[:, None, None, None, None]
    assert torch.equal(z, (1 - s) * expected + s * noise)
    assert torch.equal(kwargs["temb"], torch.tensor([0.05]))


def test_ltx2_latents_are_already_raw_and_decoders_without_timestep_get_none():
    vae = tiny_vae("random:ltx2-tiny")
    latents = torch.randn(1, 8, 2, 2, 3)
    z, kwargs = family_of(vae).prepare(vae, latents, denormalize=True, settings=DecodeSettings(timestep=0.05))
    assert torch.equal(z, latents) and kwargs == {}


@pytest.mark.parametrize(("preset", "reference"), [
    ("random:hunyuanvideo-tiny", lambda vae, x: x.to(vae.dtype) / vae.config.scaling_factor),
    ("random:hunyuanvideo1.5-tiny", lambda vae, x: x.to(vae.dtype) / vae.config.scaling_factor),
    ("random:cogvideox-tiny", lambda vae, x: 1 / vae.config.scaling_factor * x),
    ("random:mochi-tiny", lambda vae, x: x * torch.tensor(vae.config.latents_std).view(1, 12, 1, 1, 1).to(x.dtype)
     / vae.config.scaling_factor + torch.tensor(vae.config.latents_mean).view(1, 12, 1, 1, 1).to(x.dtype)),
])
def test_denormalisation_is_the_pipelines(preset, reference):
    """The expression each diffusers pipeline applies before vae.decode (hunyuan_video, hunyuan_video1_5, cogvideo,
    mochi), in the same dtype and order."""
    vae = tiny_vae(preset, torch.bfloat16)
    latents = torch.randn(1, family_of(vae).z_dim(vae), 2, 2, 3).to(torch.bfloat16)
    z, _ = family_of(vae).prepare(vae, latents, denormalize=True, settings=DecodeSettings())
    assert torch.equal(z, reference(vae, latents).to(vae.dtype))


def test_default_repo_only_where_one_family_has_the_width():
    assert families.default_repo(12) == "genmo/mochi-1-preview"
    assert families.default_repo(32).startswith("hunyuanvideo-community/HunyuanVideo-1.5")
    assert families.default_repo(16) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # the default before other families
    with pytest.raises(BadInput, match="128 channels, which fits LTX-Video 0.9 and LTX-2: pass the VAE with --vae"):
        families.default_repo(128)
    with pytest.raises(BadInput, match="no diffusers video VAE"):
        families.default_repo(7)


def test_presets_are_each_familys_released_architecture():
    import inspect

    import diffusers

    for name, (family, config) in families.PRESETS.items():
        if name.endswith("-tiny"):
            continue
        cls = getattr(diffusers, family.classes[0])
        assert set(config) <= set(inspect.signature(cls.__init__).parameters), name
    assert families.preset_channels("random:ltx") == 128 and families.preset_channels("random:mochi") == 12
    assert families.preset_channels("random:hunyuanvideo1.5") == 32 and families.preset_channels("random:kvae") == 16


@pytest.mark.parametrize(("preset", "size", "shape"), [("random:hunyuanvideo-tiny", "16x24x9", (1, 16, 3, 2, 3)),
                                                       ("random:ltx-tiny", "64x96x17", (1, 8, 3, 2, 3)),
                                                       ("random:cogvideox-tiny", "16x24x8", (1, 16, 2, 2, 3)),
                                                       ("random:mochi-tiny", "16x24x13", (1, 12, 3, 2, 3))])
def test_synthetic_latents_fit_each_familys_geometry(preset, size, shape):
    assert tuple(families.synthetic_latents(tiny_vae(preset), size).shape) == shape


def test_a_size_that_does_not_fit_the_family_is_bad_input():
    with pytest.raises(BadInput, match=r"fit the VAE \(LTX-Video 0.9\): height and width must be multiples of 32"):
        families.synthetic_latents(tiny_vae("random:ltx-tiny"), "720x1280x81")
    with pytest.raises(BadInput, match=r"frames a count it decodes to \(9, 17, 33, 65…\)"):
        families.synthetic_latents(tiny_vae("random:ltx-tiny"), "64x96x16")
