"""Wan 2.1 and 2.2 (`AutoencoderKLWan`): streamed exactly, one latent frame per decoder call.

The stream makes exactly the calls of diffusers' `_decode` (post-quant conv on the whole latent, then the decoder
one latent frame at a time with the causal feature cache), but hands each piece on instead of growing one
`torch.cat`: memory stays bounded and the concatenated stream is bit-identical to `vae.decode`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..bands import Frames, Plan, Slab, TailShape
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
    cannot_band = ""
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

    def tail_shape(self, vae) -> TailShape:
        """The decoder's up blocks and output conv as the band loop sees them (see vaepipe/bands.py)."""
        decoder = vae.decoder
        ops, channels, frames, caches = [], [], [], []
        t = 1
        for stage, block in enumerate(decoder.up_blocks):
            steps, width = [], 0
            for resnet in block.resnets:
                for conv in (resnet.conv1, resnet.conv2):
                    steps.append(("conv", conv._padding[2]))
                    caches.append((stage, conv.in_channels, CACHE_FRAMES, conv._padding[2]))
                    width = max(width, conv.in_channels, conv.out_channels)
            up = _upsampler(block)
            frames.append(t)
            if up is not None:
                if up.mode == "upsample3d":
                    caches.append((stage, up.time_conv.in_channels, CACHE_FRAMES, 0))
                    t *= 2
                steps += [("up", 2), ("conv", up.resample[1].padding[0])]
            ops.append(steps)
            channels.append(width)
        if _upsampler(decoder.up_blocks[-1]) is not None:
            raise NotImplementedError("a Wan decoder whose last up block upsamples")  # (no released one does)
        ops[-1].append(("conv", decoder.conv_out._padding[2]))
        caches.append((len(ops) - 1, decoder.conv_out.in_channels, CACHE_FRAMES, decoder.conv_out._padding[2]))
        return TailShape(ops=tuple(map(tuple, ops)), channels=tuple(channels), frames=tuple(frames),
                         caches=tuple(caches), head_channels=decoder.mid_block.resnets[-1].conv2.out_channels,
                         patch=vae.config.patch_size or 1)

    def banded(self, vae, z: torch.Tensor, plan: Plan) -> Iterator[Frames]:
        """`stream` in the bands of `plan` (one latent frame per call), with diffusers' own modules: its head (conv_in,
        the mid block) on whole frames, its up blocks and output conv on each band's slab."""
        from ..bands import stream

        _, _, _, h, w = z.shape
        scale = vae.config.get("scale_factor_spatial") or 8
        yield from stream(_DiffusersTail(vae), vae.post_quant_conv(z), plan, width=w * scale,
                          temporal=self.temporal_factor(vae))


CACHE_FRAMES = 2
"""Input frames each causal conv keeps for the next call (diffusers' CACHE_T)."""


def _upsampler(block):
    return getattr(block, "upsampler", None) or (block.upsamplers[0] if getattr(block, "upsamplers", None) else None)


def _cached(conv, x: torch.Tensor, cache: list, idx: int) -> torch.Tensor:
    """diffusers' causal conv call with its feature cache, as `WanDecoder3d.forward` makes it for conv_in/conv_out."""
    cache_x = x[:, :, -CACHE_FRAMES:].clone()
    if cache_x.shape[2] < 2 and cache[idx] is not None:
        cache_x = torch.cat([cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    x = conv(x, cache[idx])
    cache[idx] = cache_x
    return x


class _DiffusersTail:
    """diffusers' `WanDecoder3d.forward` split for the band loop (bands.Tail): the same calls, with a feature cache
    for the head and one per band."""

    def __init__(self, vae):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.decoder = vae.decoder
        self.patch = vae.config.patch_size
        self.size = sum(isinstance(m, WanCausalConv3d) for m in self.decoder.modules())
        self.head_cache = [None] * self.size
        self.cache: list = []
        self.tail_start = 0

    def head(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        x = _cached(self.decoder.conv_in, x, self.head_cache, 0)
        idx = [1]
        x = self.decoder.mid_block(x, feat_cache=self.head_cache, feat_idx=idx)
        self.tail_start = idx[0]
        return x

    def start(self, s: Slab, chunk: int) -> None:
        self.cache = [None] * self.size

    def state(self) -> list:
        return self.cache

    def load(self, state: list) -> None:
        self.cache = state

    def tail(self, x: torch.Tensor, s: Slab, first: bool) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        idx = [self.tail_start]
        for i, block in enumerate(self.decoder.up_blocks):
            x = block(s.crop(i, x), feat_cache=self.cache, feat_idx=idx, first_chunk=first)
        x = self.decoder.nonlinearity(self.decoder.norm_out(x))
        x = s.crop(len(self.decoder.up_blocks), _cached(self.decoder.conv_out, x, self.cache, idx[0]))
        if self.patch is not None:
            x = unpatchify(x, patch_size=self.patch)
        return torch.clamp(x, min=-1.0, max=1.0)

    def write(self, out: torch.Tensor, frames: torch.Tensor) -> None:
        from ..decode import to_uint8_frames

        to_uint8_frames(out, frames)


FAMILY = Wan()
