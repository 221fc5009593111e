"""One module per diffusers video VAE family: how it walks through time, its pipeline's latent transform, its
random-weight presets and its default repos. `family_of(vae)` picks the module for a loaded model.

Each family streams one of three ways (README: "Every diffusers video VAE"):
- exact: diffusers itself decodes piece by piece (causal cache carried from call to call); the stream makes the
  same calls with a cache of its own and hands each piece on;
- tiles: diffusers decodes overlapping temporal tiles and blends them; the stream decodes tile by tile and holds
  back only the frames the next tile's blend still changes;
- whole: diffusers decodes the clip in one call; its output exists only whole, so it is decoded whole (the
  fallback, with a warning) and handed on in pieces.
"""

from __future__ import annotations

import torch

from ..errors import BadInput
from . import cogvideox, hunyuanvideo, hunyuanvideo15, kandinsky6, kvae, ltx, mochi, others, wan
from ._base import DecodeSettings, Family

FAMILIES: tuple[Family, ...] = (wan.FAMILY, hunyuanvideo.FAMILY, hunyuanvideo15.FAMILY, ltx.LTX, ltx.LTX2,
                                cogvideox.FAMILY, mochi.FAMILY, kvae.FAMILY, kandinsky6.FAMILY,
                                *others.FAMILIES)
_BY_CLASS = {cls: family for family in FAMILIES for cls in family.classes}
PRESETS: dict[str, tuple[Family, dict]] = {name: (f, config) for f in FAMILIES for name, config in f.presets.items()}
"""Random-weight VAEs by name (random:<family>, random:<family>-tiny): full size is the released architecture."""

PRESET_NAMES = ", ".join(name.removeprefix("random:") for name in PRESETS if not name.endswith("-tiny"))
"""For messages: the preset stems, each also with -tiny."""

__all__ = ["FAMILIES", "PRESETS", "PRESET_NAMES", "DecodeSettings", "Family", "default_repo", "family_of",
           "preset_channels", "synthetic_latents", "synthetic_shape", "vaes_with"]


def family_of(vae: torch.nn.Module) -> Family:
    """The family of a loaded diffusers VAE; an unknown class decodes whole through the generic fallback."""
    return _BY_CLASS.get(type(vae).__name__, others.GENERIC)


def preset_channels(name: str) -> int:
    """Latent channels of a preset, known without building it."""
    family, config = PRESETS[name]
    return family.preset_channels(config)


def default_repo(channels: int) -> str:
    """The diffusers repo whose VAE fits latents of `channels` channels, where only one family has that width."""
    for family in FAMILIES:
        if channels in family.default_repos:
            return family.default_repos[channels]
    fits = [f.label for f in FAMILIES if channels in f.channels]
    if fits:
        raise BadInput(f"latents have {channels} channels, which fits {' and '.join(fits)}: pass the VAE with --vae"
                       " (a diffusers folder, a cached repo id such as "
                       f"{next(f for f in FAMILIES if channels in f.channels).repos[0]}, or a preset)")
    raise BadInput(f"latents have {channels} channels and no diffusers video VAE known to vaepipe has that many:"
                   " pass --vae")


def vaes_with(channels: int) -> str | None:
    """For messages: the families whose latents have `channels` channels, each with its preset (and the repo
    vaepipe takes for them), or None where no family has that many."""
    fits = []
    for family in FAMILIES:
        if channels not in family.channels:
            continue
        preset = next(n for n in family.presets if not n.endswith("-tiny") and preset_channels(n) == channels)
        repo = family.default_repos.get(channels) or (family.repos[0] if family.repos and len(family.channels) == 1
                                                      else None)
        fits.append(f"{family.label} (--vae {preset}{f' or {repo}' if repo else ''})")
    return ", ".join(fits) or None


def synthetic_latents(vae: torch.nn.Module, size: str, *, seed: int = 0) -> torch.Tensor:
    """N(0, 1) latents [1, C, T, H, W] that `vae` decodes to `size` (HEIGHTxWIDTHxFRAMES), as its pipeline leaves
    them with output_type="latent"; for benchmarks."""
    return torch.randn(synthetic_shape(vae, size), generator=torch.Generator().manual_seed(seed))


def synthetic_shape(vae: torch.nn.Module, size: str) -> tuple[int, ...]:
    """The shape of `synthetic_latents`, checked to fit in memory before anything is allocated; `vae` may be on the
    meta device (a preset's, to check a size before the real one loads)."""
    from ..latents import check_declared, parse_size

    family = family_of(vae)
    height, width, frames = parse_size(size)
    scale = family.spatial_factor(vae)
    latent_frames = next((t for t in range(1, frames + 1) if family.num_frames(vae, t) == frames), None)
    if height % scale or width % scale or latent_frames is None:
        fits = ", ".join(str(family.num_frames(vae, t)) for t in (2, 3, 5, 9))
        raise BadInput(f"size {size} does not fit the VAE ({family.label}): height and width must be multiples of"
                       f" {scale}, frames a count it decodes to ({fits}…)")
    shape = (1, family.z_dim(vae), latent_frames, height // scale, width // scale)
    check_declared(f"size {size}", shape, torch.float32, fix="use a smaller size")
    return shape
