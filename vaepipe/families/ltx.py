"""LTX-Video 0.9.x (`AutoencoderKLLTXVideo`) and LTX-2 (`AutoencoderKLLTX2Video`): decoded whole.

Their released decoders are not causal in time (`decoder_causal: false`: each frame depends on the frames after it)
and diffusers decodes the clip in one decoder call by default, so no frame is final before the whole clip is; and
the same convs over a part of the clip do not give the same bits (the kernels' summation order depends on the
extent). With framewise decoding switched on (`vae.use_framewise_decoding = True`, a library user's choice), diffusers
decodes blended temporal tiles instead, and the stream follows it tile by tile (see _tiles.py).

Latents: LTX-Video pipelines leave them normalised (and packed [B, S, C] with output_type="latent": save them
unpacked, [B, 128, T, H, W]); the pipeline decodes `latents * std / scaling_factor + mean`. LTX-2 pipelines
denormalise before returning latents, so they decode as they are. Timestep-conditioned decoders (LTX 0.9.1+) take
the decode timestep (default 0.0) and mix in noise at decode_noise_scale (default: the timestep), as the pipelines do.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._base import DecodeSettings, Family
from ._tiles import temporal_tiles

# LTX-Video 0.9.5's VAE, also that of 0.9.7 and 0.9.8 (diffusers' scripts/convert_ltx_to_diffusers.py).
LTX095_CONFIG = dict(
    block_out_channels=(128, 256, 512, 1024, 2048), down_block_types=("LTXVideo095DownBlock3D",) * 4,
    decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2),
    decoder_layers_per_block=(5, 5, 5, 5), spatio_temporal_scaling=(True,) * 4,
    decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True,) * 3,
    upsample_factor=(2, 2, 2), timestep_conditioning=True, spatial_compression_ratio=32, temporal_compression_ratio=8,
)
# LTX-2's video VAE (diffusers' scripts/convert_ltx2_to_diffusers.py, version 2.0).
LTX2_CONFIG = dict(
    block_out_channels=(256, 512, 1024, 2048), decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2), decoder_layers_per_block=(5, 5, 5, 5), spatio_temporal_scaling=(True,) * 4,
    decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), upsample_type=("spatiotemporal",) * 3,
    upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2), timestep_conditioning=False, decoder_causal=False,
    encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="reflect", spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)
# Same shapes of blocks, narrow channels (the residual upsamplers need each level twice the one above).
_TINY = dict(block_out_channels=(8,) * 5, decoder_block_out_channels=(8, 16, 32), layers_per_block=(1,) * 5,
             decoder_layers_per_block=(1,) * 4, latent_channels=8)


class LTXVideo(Family):
    name = "ltx"
    label = "LTX-Video 0.9"
    classes = ("AutoencoderKLLTXVideo",)
    streams = "whole"
    why = ("one decoder call over the whole clip, not causal in time; blended temporal tiles only when framewise"
           " decoding is switched on")
    presets = {"random:ltx": LTX095_CONFIG, "random:ltx-tiny": {**LTX095_CONFIG, **_TINY}}
    channels = (128,)
    repos = ("Lightricks/LTX-Video-0.9.7-dev", "Lightricks/LTX-Video-0.9.5", "Lightricks/LTX-Video")
    normalised = True
    """The pipeline's latents are still normalised (LTX-2's are not)."""

    def streams_for(self, vae) -> str:
        return "tiles" if vae.use_framewise_decoding else "whole"

    def prepare(self, vae, latents: torch.Tensor, *, denormalize: bool,
                settings: DecodeSettings) -> tuple[torch.Tensor, dict]:
        z = latents.to(vae.device)
        if denormalize and self.normalised:
            z = _denormalize(vae, z)  # in the latents' dtype, as the pipeline
        # The pipeline then goes through its transformer's dtype before vae.dtype; we cannot know it, so straight on.
        z = z.to(vae.dtype)
        if not vae.config.timestep_conditioning:
            return z, {}
        timestep = 0.0 if settings.timestep is None else settings.timestep
        scale = timestep if settings.noise_scale is None else settings.noise_scale
        if scale:
            # (1 - s) * latents + s * noise: LTX-Video mixes after denormalising, LTX-2 before.
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(settings.noise_seed))
            noise = noise.to(z.device, z.dtype)
            s = torch.tensor([scale], device=z.device, dtype=z.dtype)[:, None, None, None, None]
            if self.normalised:
                z = (1 - s) * z + s * noise
            else:
                z = _denormalize(vae, (1 - s) * _normalize(vae, z) + s * noise)
        return z, {"temb": torch.tensor([timestep], device=z.device, dtype=z.dtype)}

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        tile_latent = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio
        if not (vae.use_framewise_decoding and z.shape[2] > tile_latent):
            yield self.decode(vae, z, **kwargs)
            return
        yield from temporal_tiles(vae, z, lambda tile: self._decode_tile(vae, tile, **kwargs), drop="last")

    def _decode_tile(self, vae, tile: torch.Tensor, temb=None) -> torch.Tensor:
        tile_min_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
        tile_min_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
        if vae.use_tiling and (tile.shape[-1] > tile_min_w or tile.shape[-2] > tile_min_h):
            return vae.tiled_decode(tile, temb, return_dict=True).sample
        return vae.decoder(tile, temb)


class LTX2Video(LTXVideo):
    name = "ltx2"
    label = "LTX-2"
    classes = ("AutoencoderKLLTX2Video",)
    presets = {"random:ltx2": LTX2_CONFIG, "random:ltx2-tiny": {**LTX2_CONFIG, **_TINY, "block_out_channels": (8,) * 4}}
    repos = ("Lightricks/LTX-2",)
    normalised = False


def _denormalize(vae, z: torch.Tensor) -> torch.Tensor:
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = vae.latents_std.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return z * std / vae.config.scaling_factor + mean


def _normalize(vae, z: torch.Tensor) -> torch.Tensor:
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = vae.latents_std.view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return (z - mean) * vae.config.scaling_factor / std


LTX = LTXVideo()
LTX2 = LTX2Video()
