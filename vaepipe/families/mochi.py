"""Mochi 1 (`AutoencoderKLMochi`): decoded whole.

diffusers' default decode is one decoder call over the whole clip (`use_framewise_decoding` is off; its framewise
mode pads differently and so gives other frames). Its causal convs and per-position projections over a part of the
clip do not give the same bits as over the whole (the kernels' summation order depends on the extent: measured on the
CPU), so the frames exist exactly only whole. The pipeline decodes `latents * std / scaling_factor + mean` in the
latents' dtype; a latent frame makes 6 frames, the first 1 (diffusers drops the first 5 of the decoded clip).
"""

from __future__ import annotations

import torch

from ._base import Family


class Mochi(Family):
    name = "mochi"
    label = "Mochi 1"
    classes = ("AutoencoderKLMochi",)
    streams = "whole"
    why = "one decoder call over the whole clip (framewise decoding off by default)"
    # AutoencoderKLMochi() defaults are the released VAE (genmo/mochi-1-preview/vae); its group norms take 32 groups.
    presets = {"random:mochi": {},
               "random:mochi-tiny": dict(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                                         layers_per_block=(1,) * 5)}
    channels = (12,)
    default_repos = {12: "genmo/mochi-1-preview"}
    repos = ("genmo/mochi-1-preview",)

    def prepare(self, vae, latents, *, denormalize, settings):
        z = latents.to(vae.device)
        if denormalize:
            config = vae.config
            if config.latents_mean is not None and config.latents_std is not None:
                shape = (1, len(config.latents_mean), 1, 1, 1)
                mean = torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype)
                std = torch.tensor(config.latents_std).view(shape).to(z.device, z.dtype)
                z = z * std / config.scaling_factor + mean
            else:
                z = z / config.scaling_factor
        return z.to(vae.dtype), {}


FAMILY = Mochi()
