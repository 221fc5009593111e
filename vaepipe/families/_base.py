"""What every family module provides, with the defaults most diffusers video VAEs share."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import BadInput

if TYPE_CHECKING:
    from ..bands import Frames, Plan, TailShape


@dataclass(kw_only=True, frozen=True, slots=True)
class DecodeSettings:
    """What a pipeline hands `vae.decode` besides the latents (timestep-conditioned decoders: LTX 0.9.1+)."""

    timestep: float | None = None
    """decode_timestep; None: the pipeline's default (0.0)."""
    noise_scale: float | None = None
    """decode_noise_scale; None: the pipeline's default (the decode timestep)."""
    noise_seed: int = 0
    """Seed of the noise mixed in when noise_scale > 0 (a CPU generator; not the pipeline's own draw)."""


class Family:
    """One diffusers video VAE family. Subclasses set the attributes and override what their pipeline does
    differently; an instance is the module's `FAMILY`."""

    name = ""
    """Preset stem: random:<name> and random:<name>-tiny."""
    label = ""
    """For people: HunyuanVideo, LTX-Video…"""
    classes: tuple[str, ...] = ()
    """diffusers class names."""
    streams = "whole"
    """exact, tiles or whole (see the package docstring), with the pipeline's default settings."""
    why = ""
    """How diffusers' decode walks through time, in a few words: the README table and the fallback warning."""
    presets: dict[str, dict] = {}
    """Random-weight presets: name -> config kwargs."""
    channel_key = "latent_channels"
    channels: tuple[int, ...] = ()
    """Latent widths of the released VAEs."""
    default_repos: dict[int, str] = {}
    """Latent width -> the diffusers repo used when --vae is not given (only where no other family has that width)."""
    repos: tuple[str, ...] = ()
    """Diffusers repos with this VAE in vae/, for messages and the README."""
    unsupported = ""
    """Why vaepipe refuses this VAE, where even the whole-clip fallback would write wrong frames."""
    cannot_band = ("its decoder normalises with GroupNorm, whose statistics span the whole frame: banding needs them"
                   " carried over the bands, not built yet")
    """Why this family decodes whole frames only ("": it decodes in bands, see vaepipe/bands.py)."""

    # Building and describing a model.

    def build(self, config: dict) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.classes[0])(**config)

    def preset_channels(self, config: dict) -> int:
        import diffusers

        if self.channel_key in config:
            return int(config[self.channel_key])
        signature = inspect.signature(getattr(diffusers, self.classes[0]).__init__)
        return int(signature.parameters[self.channel_key].default)

    def z_dim(self, vae) -> int:
        return int(vae.config[self.channel_key])

    def temporal_factor(self, vae) -> int:
        """Frames each latent frame after the first decodes to."""
        config = vae.config
        return int(getattr(vae, "temporal_compression_ratio", None) or config.get("temporal_compression_ratio")
                   or config.get("scale_factor_temporal") or 4)

    def spatial_factor(self, vae) -> int:
        config = vae.config
        return int(config.get("scale_factor_spatial") or getattr(vae, "spatial_compression_ratio", None)
                   or config.get("spatial_compression_ratio") or 8)

    def num_frames(self, vae, latent_frames: int) -> int:
        return 1 + self.temporal_factor(vae) * (latent_frames - 1)

    def streams_for(self, vae) -> str:
        """How this model streams with its current settings (a library user may have switched tiling on)."""
        return self.streams

    # Latents.

    def check(self, vae, shape: tuple[int, ...], name: str, channels: int) -> None:
        """Raise BadInput for latents [B, C, T, H, W] of file `name` that this VAE (None for a preset not built yet)
        of `channels` latent channels cannot decode; runs before the channel check, to name a better fix."""

    def prepare(self, vae, latents: torch.Tensor, *, denormalize: bool,
                settings: DecodeSettings) -> tuple[torch.Tensor, dict]:
        """Latents as the pipeline leaves them with output_type="latent" -> (z on the VAE's device and dtype, the
        extra arguments of `vae.decode`), with the arithmetic of the pipeline's own decode step."""
        z = latents.to(vae.device, vae.dtype)
        return (self.denormalize(vae, z) if denormalize else z), {}

    def denormalize(self, vae, z: torch.Tensor) -> torch.Tensor:
        scaling = vae.config.get("scaling_factor")
        if scaling is None:
            raise BadInput(f"{type(vae).__name__}'s config has no scaling_factor: pass --no-denormalize if the latents"
                           " are already raw")
        return z / scaling

    # Decoding.

    def decode(self, vae, z: torch.Tensor, **kwargs) -> torch.Tensor:
        """diffusers' own decode [B, 3, F, H, W]: the reference the stream equals."""
        return vae.decode(z, **kwargs).sample

    def tail_shape(self, vae) -> TailShape:
        """The part of the decoder that runs in bands (families that band)."""
        raise NotImplementedError(self.cannot_band)

    def banded(self, vae, z: torch.Tensor, plan: Plan) -> Iterator[Frames]:
        """`stream` in the bands of `plan` with diffusers' own modules (families that band)."""
        raise NotImplementedError(self.cannot_band)

    def stream(self, vae, z: torch.Tensor, **kwargs) -> Iterator[torch.Tensor]:
        """Pieces [1, 3, F, H, W] in order whose concatenation is `decode`; any F (decode.py re-cuts them)."""
        yield self.decode(vae, z, **kwargs)
