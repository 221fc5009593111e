"""What a decode is asked to do, checked without importing torch (a bad option is an answer in a fraction of a
second, not after seconds of imports): `DecodeOptions`, and the sizes people write (`--max-vram 6GiB`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BadInput
from .names import PRESET_STEMS

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("bf16", "fp16", "fp32")
PRESET_NAMES = {f"random:{stem}{tail}" for stem in PRESET_STEMS for tail in ("", "-tiny")}


@dataclass(kw_only=True, slots=True)
class DecodeOptions:
    vae: str | None = None
    """A preset (random:wan2.1, random:hunyuanvideo…), a diffusers folder, a cached Hub repo id or a checkpoint file;
    None picks the diffusers VAE matching the latents' channels from the local Hub cache, where only one fits."""
    dtype: str | None = None
    """bf16, fp16 or fp32; None: bf16 on CUDA, fp32 on the CPU."""
    device: str | None = None
    """cuda, cuda:N or cpu; None: cuda when there is one."""
    chunk: int | None = None
    """Latent frames per decoder call after the first (the engine) or per pipeline step (diffusers' decoder, which
    still decodes one at a time); None: the engine takes what fits in memory, diffusers' decoder 1."""
    buffers: int = 2
    """Slots per lane (VRAM and pinned host buffers)."""
    sync: bool = False
    """Decode, copy and encode one after another on one stream (the baseline)."""
    denormalize: bool = True
    """Undo the pipeline's latent normalisation before decoding."""
    exact: bool = False
    """Frames bit-identical to diffusers' `vae.decode`: on GPUs the engine's exact policy (self-checked against
    diffusers' ops), on the CPU diffusers' own decoder."""
    fast: bool = False
    """Kept for old command lines: the engine's fast policy is what GPUs run by default now."""
    engine: bool | None = None
    """Decode with vaepipe's engine; None: on CUDA for Wan VAEs. False: diffusers' own decoder, streamed. True on
    the CPU runs the engine's PyTorch reference ops (tests)."""
    decode_timestep: float | None = None
    """Timestep-conditioned decoders (LTX 0.9.1+): the pipeline's decode_timestep; None: the latents file's, else 0."""
    decode_noise_scale: float | None = None
    """Their decode_noise_scale; None: the latents file's, else the decode timestep (the pipelines' defaults)."""
    bands: int | None = None
    """Horizontal bands each frame decodes in (vaepipe/bands.py); None: one, or what --max-vram (else the free
    memory) calls for."""
    max_vram: str | int | None = None
    """Device memory the decode may use at its peak (6GiB, 6000MB, bytes): the fewest bands that fit."""
    band_caches: str | None = None
    """Where the bands' causal caches wait between windows: device or host; None: where they fit."""

    def __post_init__(self) -> None:
        for name in ("chunk", "buffers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise BadInput(f"{name} must be an integer, got {value!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise BadInput(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.exact and self.fast:
            raise BadInput("--exact and --fast contradict each other: --exact gives diffusers' bits, the default on"
                           " GPUs is the fast engine; drop --fast")
        if self.chunk is not None and not 1 <= self.chunk <= 64:
            raise BadInput(f"chunk must be in 1..64, got {self.chunk}")
        if not 2 <= self.buffers <= 8:
            raise BadInput(f"buffers must be in 2..8, got {self.buffers}")
        if self.vae and self.vae.startswith("random:") and self.vae not in PRESET_NAMES:
            raise BadInput(f"unknown preset {self.vae!r}: use random:NAME or random:NAME-tiny, NAME one of"
                           f" {', '.join(PRESET_STEMS)}")
        if self.device is not None and not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise BadInput(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.bands is not None and not 1 <= self.bands <= 4096:
            raise BadInput(f"bands must be in 1..4096, got {self.bands}")
        if self.band_caches not in (None, "device", "host"):
            raise BadInput(f"band_caches must be device or host, got {self.band_caches!r}")
        if self.max_vram is not None:
            parse_bytes(self.max_vram)
        for name in ("decode_timestep", "decode_noise_scale"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:  # also NaN
                raise BadInput(f"{name} must be in 0..1, got {value}")

    def torch_device(self) -> torch.device:
        import torch

        spec = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if spec.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BadInput(f"device {spec} asked for, but PyTorch sees no CUDA GPU here: use --device cpu")
            device = torch.device(spec)
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise BadInput(f"device {spec} asked for, but there are {torch.cuda.device_count()} GPUs")
            return torch.device("cuda", index)
        return torch.device("cpu")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        from .vae import DTYPES

        return DTYPES[self.dtype or ("bf16" if device.type == "cuda" else "fp32")]


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(text: str | int, *, name: str = "--max-vram") -> int:
    """A size for people into bytes: 6GiB, 6G (binary), 6GB (decimal), 512MiB, 6.5GiB, or plain bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        value, unit = (float(m.group(1)), m.group(2).lower()) if m else (0.0, "?")
    if unit not in _UNITS or value <= 0:
        raise BadInput(f"{name} must be a size such as 6GiB, 6G or 6000MB, got {text!r}")
    return int(value * _UNITS[unit])
