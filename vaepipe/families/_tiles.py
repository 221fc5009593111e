"""Temporal tiles, streamed: diffusers' `_temporal_tiled_decode` (HunyuanVideo, LTX-Video, LTX-2) one tile at a time.

diffusers decodes every tile of `tile_sample_min_num_frames`, then blends each tile's first `blend` frames with the
previous tile's last ones (in place, so the blended tile is what the next blend reads), keeps `stride` frames per
tile and concatenates. A tile's kept frames are final once it is blended: only its last `blend` frames are still
needed, by the next tile. So each tile is decoded, blended with the held frames, handed on, and its tail held: the
same calls and the same arithmetic (the model's own `blend_t`) in the same order, with one tile in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def temporal_tiles(vae, z: torch.Tensor, decode_tile: Callable[[torch.Tensor], torch.Tensor], *,
                   drop: str) -> Iterator[torch.Tensor]:
    """Yield the frames of `vae._temporal_tiled_decode(z)` tile by tile. `decode_tile(z_tile)` decodes one tile as
    diffusers does; `drop` is which frame diffusers discards from every tile after the first ("first" or "last")."""
    tc = vae.temporal_compression_ratio
    tile_latent = vae.tile_sample_min_num_frames // tc
    stride_latent = vae.tile_sample_stride_num_frames // tc
    stride = vae.tile_sample_stride_num_frames
    blend = vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames
    left = (z.shape[2] - 1) * tc + 1  # diffusers crops the concatenation to this
    held = None
    for i in range(0, z.shape[2], stride_latent):
        tile = decode_tile(z[:, :, i : i + tile_latent + 1])
        if i > 0:
            tile = tile[:, :, 1:] if drop == "first" else tile[:, :, :-1]
            # blend_t reads a[-extent:], extent = min(len(a), len(b), blend): the held tail gives the same extent
            # and the same frames as the whole previous tile did.
            tile = vae.blend_t(held, tile, blend)
            out = tile[:, :, :stride]
        else:
            out = tile[:, :, : stride + 1]
        keep = min(blend, tile.shape[2])
        held = tile[:, :, tile.shape[2] - keep :].clone()  # a copy, so the rest of the tile can go
        out = out[:, :, :left]
        left -= out.shape[2]
        if out.shape[2]:
            yield out
        del tile, out
