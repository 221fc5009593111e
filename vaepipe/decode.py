"""Decoding: latents into video, in pieces as soon as they are final, and video into uint8 frames.

`decode_stream` is the one dispatcher: the VAE's family (vaepipe/families/) knows how its decode walks through time
(Wan, CogVideoX, KVAE: exact piece by piece with their own cache; HunyuanVideo: temporal tiles; others whole); the
pieces it yields concatenate to `vae.decode(z).sample` bit for bit, and are cut here to at most one latent frame's
worth of frames each, on latent-frame boundaries, so the lanes' buffers have a fixed size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .families import family_of


def decode_stream(vae: torch.nn.Module, z: torch.Tensor, **decode_kwargs) -> Iterator[torch.Tensor]:
    """Yield the decoded video of one sample `z` [1, C, T, H, W] as pieces [1, 3, F, H', W'] in order, F at most
    `frames_per_latent(vae)`: the first frame alone, then the frames of each later latent frame (as far as the
    family's own pieces allow). `decode_kwargs`: what the pipeline passes `vae.decode` besides z (LTX's `temb`)."""
    step = frames_per_latent(vae)
    done = 0  # frames handed on so far: boundaries at 1, 1 + step, 1 + 2 * step…
    for piece in family_of(vae).stream(vae, z, **decode_kwargs):
        at = 0
        while at < piece.shape[2]:
            boundary = 1 if done == 0 else done + step - (done - 1) % step
            n = min(boundary - done, piece.shape[2] - at)
            yield piece[:, :, at : at + n]
            at += n
            done += n


def frames_per_latent(vae: torch.nn.Module) -> int:
    """Frames each latent frame after the first decodes to (the VAE's temporal factor)."""
    return family_of(vae).temporal_factor(vae)


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
