"""The other diffusers video VAEs, decoded whole through `vae.decode`: why each cannot stream as it is.

- Cosmos (`AutoencoderKLCosmos`): one decoder call over the whole clip, with causal temporal attention.
- EasyAnimate (`AutoencoderKLMagvit`): first frame, then batches, with the conv cache kept in the modules
  themselves (`prev_features`): a stream would have to swap the model's state; not streamed yet.
Refused (bad input, with the reason), because the generic fallback would write wrong frames:
- Allegro (`AutoencoderKLAllegro`): decodes only with tiling on, and returns [B, T, C, H, W];
- MiniMax-H3 (`AutoencoderKLMiniMaxH3`): returns ImageNet-normalised pixels, not [-1, 1];
- Stable Video Diffusion (`AutoencoderKLTemporalDecoder`): per-frame 4-D latents, decoded with a frame count;
- LTX-2's diffusion decoder (`LTX2VideoDiffusionDecoderModel`): iterative, not one VAE decode.
Anything else is decoded whole with the generic arithmetic (scaling_factor, shift_factor).
"""

from __future__ import annotations

from ._base import Family


class Whole(Family):
    def __init__(self, name: str, label: str, cls: str, why: str, unsupported: str = ""):
        self.name, self.label, self.classes, self.why, self.unsupported = name, label, (cls,), why, unsupported

    def denormalize(self, vae, z):
        z = super().denormalize(vae, z)
        shift = vae.config.get("shift_factor")
        return z + shift if shift else z


FAMILIES = (
    Whole("cosmos", "Cosmos", "AutoencoderKLCosmos", "one decoder call over the whole clip, causal temporal attention"),
    Whole("easyanimate", "EasyAnimate", "AutoencoderKLMagvit", "first frame then batches, cache held in the modules"),
    Whole("allegro", "Allegro", "AutoencoderKLAllegro", "3-D tiles overlap-added into one buffer",
          unsupported="it decodes only with tiling on and returns [B, T, C, H, W] frames"),
    Whole("minimax-h3", "MiniMax-H3", "AutoencoderKLMiniMaxH3", "ViT decoder over chunks, cross-faded overlaps",
          unsupported="it returns ImageNet-normalised pixels, not [-1, 1]"),
    Whole("svd", "Stable Video Diffusion", "AutoencoderKLTemporalDecoder", "frames in chunks",
          unsupported="its latents are per-frame images [B*F, 4, H, W], decoded with a frame count"),
    Whole("ltx2-diffusion-decoder", "LTX-2 diffusion decoder", "LTX2VideoDiffusionDecoderModel", "denoising steps",
          unsupported="it is an iterative diffusion decoder, not one VAE decode"),
)
GENERIC = Whole("generic", "other VAE", "", "one vae.decode call")
