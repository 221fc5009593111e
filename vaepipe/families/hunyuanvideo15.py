"""HunyuanVideo 1.5 (`AutoencoderKLHunyuanVideo15`): decoded whole.

diffusers runs the decoder over the whole clip in one call, and its mid-block attention is causal over all latent
frames at once (each frame attends to every earlier one): no frame is final before that call ends, and the same
convs and attention over a part of the clip do not give the same bits (the kernels' summation order depends on the
extent). The pipeline decodes `latents.to(vae.dtype) / scaling_factor`.
"""

from __future__ import annotations

from ._base import Family


class HunyuanVideo15(Family):
    name = "hunyuanvideo1.5"
    label = "HunyuanVideo 1.5"
    classes = ("AutoencoderKLHunyuanVideo15",)
    streams = "whole"
    why = "one decoder call over the whole clip; causal attention over all latent frames in the mid block"
    # AutoencoderKLHunyuanVideo15() defaults are the released VAE (scripts/convert_hunyuan_video1_5_to_diffusers.py).
    presets = {"random:hunyuanvideo1.5": {},
               "random:hunyuanvideo1.5-tiny": dict(block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1,
                                                   latent_channels=4)}
    channels = (32,)
    default_repos = {32: "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"}
    repos = ("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",)


FAMILY = HunyuanVideo15()
