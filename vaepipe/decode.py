"""Decoding: latents into video, one latent frame at a time, and video into uint8 frames.

For `AutoencoderKLWan` the stream makes exactly the calls of diffusers' `_decode` (post-quant conv on the whole
latent, then the decoder one latent frame at a time with the causal feature cache), but hands each piece on instead
of growing one `torch.cat`: memory stays bounded and the concatenated stream is bit-identical to `vae.decode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def decode_stream(vae: torch.nn.Module, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the decoded video of one sample `z` [1, C, T, H, W] as pieces [1, 3, F, H', W'] in [-1, 1], in order.

    Wan VAEs stream (F = 1 for the first latent frame, then 4 each); any other diffusers VAE decodes whole.
    """
    from diffusers import AutoencoderKLWan

    if isinstance(vae, AutoencoderKLWan):
        yield from _wan_stream(vae, z)
    else:
        video = vae.decode(z).sample
        step = frames_per_latent(vae)
        for start in range(0, video.shape[2], step):
            yield video[:, :, start : start + step]


def frames_per_latent(vae: torch.nn.Module) -> int:
    """Frames each latent frame after the first decodes to (the VAE's temporal factor)."""
    config = vae.config
    return int(config.get("scale_factor_temporal") or config.get("temporal_compression_ratio") or 4)


def _wan_stream(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

    # Our own feature cache, so the model's `_feat_map` is never touched and two streams could share one model.
    feat_cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    patch_size = vae.config.patch_size
    autotune = getattr(vae, "_vaepipe_fast", False)
    x = vae.post_quant_conv(z)
    for i in range(z.shape[2]):
        with _cudnn_benchmark(autotune):
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=i == 0)
        if patch_size is not None:
            out = unpatchify(out, patch_size=patch_size)
        yield torch.clamp(out, min=-1.0, max=1.0)


def use_fast_path(vae: torch.nn.Module) -> None:
    """Opt-in speed (--fast) at the cost of exactness: the decode is no longer bit-identical to diffusers'.

    Applied once, to a model that is then used only this way; the two changes are independent.
    """
    # NDHWC conv weights make the convs run, and hand on activations, channels-last: the layout tensor cores want.
    for conv in (m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)):
        conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last_3d)
    # cuDNN times its algorithms for each conv shape on first use and keeps the fastest; set per call (see
    # _cudnn_benchmark) so that exact decodes in the same process keep the default algorithms.
    vae._vaepipe_fast = True


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def to_uint8_frames(video: torch.Tensor, out: torch.Tensor) -> None:
    """Write video [1, 3, F, H, W] as uint8 frames into `out` [F, H + pad, W + pad, 3], on the video's device.

    The conversion is diffusers' `postprocess_video` in float32 (round half to even); extra rows and columns of
    `out`, there for chroma subsampling, repeat the last real row and column. `video` may also be a piece of
    vaepipe's engine, which writes its own frames.
    """
    f, h, w = video.shape[2:]
    if isinstance(video, torch.Tensor):
        u8 = (video[0].float() * 0.5 + 0.5).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        out[:f, :h, :w].copy_(u8.permute(1, 2, 3, 0))
    else:
        video.write_uint8(out)
    if out.shape[2] > w:
        out[:f, :h, w:] = out[:f, :h, w - 1 : w]
    if out.shape[1] > h:
        out[:f, h:] = out[:f, h - 1 : h]
