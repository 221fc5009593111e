"""Kandinsky 6 super-resolution VAE (`Kandinsky6SRVAE`): streamed exactly, one segment per decoder call.

diffusers' `decode` splits the latents into segments of 4 latent frames (16 frames; the first takes the leading
latent frame too) and runs the decoder on each with a cache it made for this decode; the stream makes the same
calls with a cache of its own. The pipeline decodes `latents.to(vae.dtype) / scaling_factor`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._base import Family

_SEGMENT = 16  # diffusers' SEGMENT_FRAMES, in frames


class Kandinsky6SR(Family):
    name = "kandinsky6-sr"
    label = "Kandinsky 6 SR"
    classes = ("Kandinsky6SRVAE",)
    streams = "exact"
    why = "segments of 16 frames, cache carried from segment to segment"
    presets = {"random:kandinsky6-sr": {},
               "random:kandinsky6-sr-tiny": dict(latent_channels=4, encoder_block_out_channels=(8,) * 5,
                                                 decoder_block_out_channels=(8,) * 5, layers_per_block=1)}
    channels = (64,)

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        cache = vae.decoder.make_cache()  # a fresh one, as decode makes: the model holds no decode state
        per_segment = _SEGMENT // vae.temporal_compression_ratio
        frames = z.shape[2]
        if frames == 1:
            sizes = [1]
        else:
            sizes = [per_segment] * ((frames - 1) // per_segment)
            if (frames - 1) % per_segment:
                sizes.append((frames - 1) % per_segment)
            sizes[0] += 1
        for part in torch.split(z, sizes, dim=2):
            yield vae.decoder(part, cache)


FAMILY = Kandinsky6SR()
