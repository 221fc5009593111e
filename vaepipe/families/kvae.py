"""KVAE video (`AutoencoderKLKVAEVideo`): streamed exactly, one segment per decoder call.

diffusers' `_decode` splits the latents into segments (the first of 16 + 1 frames, then 16 each) and runs the decoder
on each with a cache dict it made for this decode (conv paddings, group-norm state); the stream makes the same
calls with a cache of its own. No diffusers pipeline uses this VAE, so latents are decoded as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._base import Family

_SEGMENT = 16  # diffusers' _decode default, in frames


class KVAEVideo(Family):
    name = "kvae"
    label = "KVAE video"
    classes = ("AutoencoderKLKVAEVideo",)
    streams = "exact"
    why = "segments of 16 frames, conv and norm cache carried from segment to segment"
    presets = {"random:kvae": {}, "random:kvae-tiny": dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)}
    channel_key = "z_channels"
    channels = (16,)

    def temporal_factor(self, vae) -> int:
        return int(vae.config.temporal_compress_times)

    def spatial_factor(self, vae) -> int:
        return 2 ** (len(vae.config.ch_mult) - 1)

    def num_frames(self, vae, latent_frames: int) -> int:
        # diffusers' segments: a last segment of a single latent frame decodes to 1 frame, not 4.
        tc = self.temporal_factor(vae)
        first, later = math.ceil((_SEGMENT + 1) / tc), _SEGMENT // tc
        short = latent_frames > first and (latent_frames - first) % later == 1
        return 1 + tc * (latent_frames - 1) - (tc - 1) * short

    def prepare(self, vae, latents, *, denormalize, settings):
        return latents.to(vae.device, vae.dtype), {}

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        cache = vae._make_decoder_cache()  # a fresh one, as _decode makes: the model holds no decode state
        tc = vae.config.temporal_compress_times
        sizes = [_SEGMENT + 1]
        left = tc * (z.shape[2] - 1) - _SEGMENT
        while left > 0:
            sizes.append(_SEGMENT)
            left -= _SEGMENT
        sizes[-1] += left
        for part in torch.split(z, [math.ceil(size / tc) for size in sizes], dim=2):
            yield vae.decoder(part, cache)


FAMILY = KVAEVideo()
