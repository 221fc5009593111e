"""Wan 2.1 and 2.2 (`AutoencoderKLWan`): streamed exactly, one latent frame per decoder call.

The stream makes exactly the calls of diffusers' `_decode` (post-quant conv on the whole latent, then the decoder
one latent frame at a time with the causal feature cache), but hands each piece on instead of growing one
`torch.cat`: memory stays bounded and the concatenated stream is bit-identical to `vae.decode`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._base import Family

# The Wan 2.2 (TI2V-5B) VAE config, as published in Wan-AI/Wan2.2-TI2V-5B-Diffusers/vae/config.json.
WAN22 = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                  0.0891, 0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                  -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313,
                  -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                  0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
)
_TINY = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


class Wan(Family):
    name = "wan"
    label = "Wan 2.1 / 2.2"
    classes = ("AutoencoderKLWan",)
    streams = "exact"
    why = "one latent frame per decoder call, causal feature cache"
    # Random weights, named so that nobody mistakes them for a trained model. The AutoencoderKLWan() defaults are
    # the Wan 2.1 VAE.
    presets = {
        "random:wan2.1": {},
        "random:wan2.1-tiny": _TINY,
        "random:wan2.2": WAN22,
        "random:wan2.2-tiny": {**WAN22, **_TINY, "decoder_base_dim": 16},
    }
    channel_key = "z_dim"
    channels = (16, 48)
    # The VAE that a diffusers Wan pipeline of each latent width uses, looked up in the local Hub cache by default.
    # 16 channels also fit HunyuanVideo and CogVideoX: Wan 2.1 stays the default, as before those were supported.
    default_repos = {16: "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 48: "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
    repos = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")

    def denormalize(self, vae, z: torch.Tensor) -> torch.Tensor:
        """diffusers' Wan pipeline before `vae.decode`, same arithmetic and dtype: `z / (1 / std) + mean`."""
        from ..latents import denormalize

        return denormalize(z, vae.config)

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

        # Our own feature cache, so the model's `_feat_map` is never touched and two streams could share one model.
        feat_cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        patch_size = vae.config.patch_size
        x = vae.post_quant_conv(z)
        for i in range(z.shape[2]):
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=i == 0)
            if patch_size is not None:
                out = unpatchify(out, patch_size=patch_size)
            yield torch.clamp(out, min=-1.0, max=1.0)


FAMILY = Wan()
