"""CogVideoX 1.0 and 1.5 (`AutoencoderKLCogVideoX`): streamed exactly, one frame batch per decoder call.

diffusers' `_decode` runs the decoder on batches of 2 latent frames (the first batch takes 3 when the count is odd),
handing a conv cache from each call to the next; the stream makes the same calls with its own cache and hands each
batch on: 8 frames per batch, 9 for an odd first one (so 13 latent frames give 49 frames, 12 give 48).
The pipeline decodes `1 / scaling_factor * latents`; its output_type="latent" leaves them as [B, T, C, H, W]
(CogVideoX 1.5 with the padding latent frames still in front).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import BadInput
from ._base import Family

_TINY = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


class CogVideoX(Family):
    name = "cogvideox"
    label = "CogVideoX"
    classes = ("AutoencoderKLCogVideoX",)
    streams = "exact"
    why = "frame batches of 2 latent frames, conv cache carried from batch to batch"
    # AutoencoderKLCogVideoX() defaults are the released architecture (THUDM/CogVideoX-2b; 5b and 1.5 differ only in
    # scaling_factor, 0.7).
    presets = {"random:cogvideox": {}, "random:cogvideox-tiny": _TINY}
    channels = (16,)
    repos = ("THUDM/CogVideoX-5b", "THUDM/CogVideoX-2b", "THUDM/CogVideoX1.5-5B")

    def streams_for(self, vae) -> str:
        return "whole" if vae.use_tiling else "exact"  # spatial tiling (a library user's switch) spans the clip

    def temporal_factor(self, vae) -> int:
        return int(vae.config.temporal_compression_ratio)

    def spatial_factor(self, vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def num_frames(self, vae, latent_frames: int) -> int:
        # Batches of 2 latent frames make 8 frames; an odd first batch of 3 makes 9.
        tf = self.temporal_factor(vae)
        return tf * latent_frames - (tf - 1) * (latent_frames % 2)

    def check(self, vae, shape: tuple[int, ...], name: str, channels: int) -> None:
        # CogVideoX pipelines leave latents [B, T, C, H, W]: say how to fix that rather than a channel count.
        if shape[1] != channels and shape[2] == channels:
            raise BadInput(f"{name!r}: latents {shape} look like CogVideoX's [B, T, C, H, W]; save"
                           " latents.permute(0, 2, 1, 3, 4) (and drop CogVideoX 1.5's padding frames in front)")

    def denormalize(self, vae, z: torch.Tensor) -> torch.Tensor:
        return 1 / vae.config.scaling_factor * z  # the pipeline's decode_latents, not z / scaling_factor

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        if vae.use_tiling and (z.shape[-1] > vae.tile_latent_min_width or z.shape[-2] > vae.tile_latent_min_height):
            yield self.decode(vae, z)  # spatial tiles over the whole clip: diffusers' tiled_decode, whole
            return
        batch = vae.num_latent_frames_batch_size
        frames = z.shape[2]
        remaining = frames % batch
        conv_cache = None
        for i in range(max(frames // batch, 1)):
            start = batch * i + (0 if i == 0 else remaining)
            part = z[:, :, start : batch * (i + 1) + remaining]
            if vae.post_quant_conv is not None:
                part = vae.post_quant_conv(part)
            out, conv_cache = vae.decoder(part, conv_cache=conv_cache)
            yield out


FAMILY = CogVideoX()
