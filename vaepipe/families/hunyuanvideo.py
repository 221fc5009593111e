"""HunyuanVideo (`AutoencoderKLHunyuanVideo`): streamed by temporal tiles.

diffusers decodes clips longer than 4 latent frames framewise by default (`use_framewise_decoding`): tiles of 5
latent frames every 3, each tile's first 4 frames blended with the previous tile's last 4. The stream decodes one
tile at a time with the same calls (see _tiles.py); shorter clips are one tile, decoded whole as diffusers does.
The pipeline decodes `latents.to(vae.dtype) / scaling_factor`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._base import Family
from ._tiles import temporal_tiles

_TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


class HunyuanVideo(Family):
    name = "hunyuanvideo"
    label = "HunyuanVideo"
    classes = ("AutoencoderKLHunyuanVideo",)
    streams = "tiles"
    why = "temporal tiles of 5 latent frames every 3, blended over 4 frames (framewise decoding, on by default)"
    # AutoencoderKLHunyuanVideo() defaults are the released VAE (hunyuanvideo-community/HunyuanVideo/vae).
    presets = {"random:hunyuanvideo": {}, "random:hunyuanvideo-tiny": _TINY}
    channels = (16,)
    repos = ("hunyuanvideo-community/HunyuanVideo",)

    def streams_for(self, vae) -> str:
        return "tiles" if vae.use_framewise_decoding else "whole"

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        tile_latent = vae.tile_sample_min_num_frames // vae.temporal_compression_ratio
        if not (vae.use_framewise_decoding and z.shape[2] > tile_latent):
            yield self.decode(vae, z)  # diffusers' _decode does not tile it either
            return
        yield from temporal_tiles(vae, z, lambda tile: _decode_tile(vae, tile), drop="first")


def _decode_tile(vae, tile: torch.Tensor) -> torch.Tensor:
    """One tile, as `_temporal_tiled_decode` decodes it (spatially tiled too when the model has tiling on)."""
    tile_min_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
    tile_min_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
    if vae.use_tiling and (tile.shape[-1] > tile_min_w or tile.shape[-2] > tile_min_h):
        return vae.tiled_decode(tile, return_dict=True).sample
    return vae.decoder(vae.post_quant_conv(tile))


FAMILY = HunyuanVideo()
