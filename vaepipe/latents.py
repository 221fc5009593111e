"""Reading latents: .pt (tensors only, never arbitrary pickles), .safetensors, .npy or ComfyUI's .latent; checked
before any GPU work."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInput
from .files import SUFFIXES, refused_pickle, regular_file
from .memory import gib, host_available

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(slots=True)
class Latents:
    tensor: torch.Tensor
    """[B, C, T, H, W] on the CPU, finite."""
    fps: float | None
    """The frame rate stored beside the latents, if any."""
    path: Path
    decode_settings: dict[str, float] = field(default_factory=dict)
    """Stored beside the latents for timestep-conditioned decoders (LTX): decode_timestep, decode_noise_scale."""
    metadata: dict = field(default_factory=dict)
    """What made them, as stored beside them (prompt, seed, model…): written into the video's tags."""
    raw: bool = False
    """Already in the VAE's own space (ComfyUI's): never denormalised."""
    fps_error: str | None = None
    """Why the stored fps was not usable (None: it was, or there was none); an error only where no fps is given."""

    def num_frames(self, temporal_factor: int) -> int:
        """Frames a causal video VAE makes of T latent frames: the first gives one, each later one `temporal_factor`."""
        return 1 + temporal_factor * (self.tensor.shape[2] - 1)


def read_latents(path: str | Path) -> Latents:
    path = regular_file(path, "latents file", "pass a .pt, .safetensors, .npy or ComfyUI .latent file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BadInput(f"cannot read latents from {str(path)!r}: use a .pt, .safetensors, .npy or ComfyUI .latent"
                       " file")
    fps, metadata = None, {}
    try:
        if suffix in (".pt", ".pth"):
            tensor, fps, metadata = _from_torch(path)
        elif suffix == ".safetensors":
            tensor, fps, metadata = _from_safetensors(path)
        elif suffix == ".latent":
            tensor, metadata = _from_comfyui(path)
        else:
            tensor = _from_numpy(path)
        tensor = _checked(tensor, path)
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e, "save plain tensors (a tensor, or a dict of tensors and numbers)") from None
    except BadInput:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, MemoryError) as e:
        if "allocate" in str(e).lower():  # sizes are checked first, so only when memory ran short meanwhile
            raise BadInput(f"{str(path)!r}: not enough memory to read these latents here ({_first_line(e)}): free"
                           " memory, or split them into smaller files") from None
        raise BadInput(f"could not read latents from {str(path)!r}: the file is truncated or not a {suffix} file"
                       f" ({_first_line(e)})") from None
    fps, fps_error = _stored_fps(fps, path)
    settings = _settings(metadata, path)
    metadata = {k: v for k, v in metadata.items() if k not in settings}
    return Latents(tensor=tensor, fps=fps, path=path, decode_settings=settings, metadata=metadata,
                   raw=suffix == ".latent", fps_error=fps_error)


def from_tensor(tensor, *, name: str = "latents") -> Latents:
    """Latents held in memory (a pipeline's `output_type="latent"` output), on any device, with the file checks."""
    if not isinstance(tensor, torch.Tensor):
        what = type(tensor).__name__
        raise BadInput(f"latents must be a torch.Tensor [B, C, T, H, W], got a {what}: call the pipeline with"
                       ' output_type="latent" and pass its .frames')
    if tensor.device.type == "meta":
        raise BadInput("latents are on the meta device, which holds shapes but no values: pass the tensor the"
                       " pipeline returned, on the CPU or a GPU")
    if tensor.layout != torch.strided:
        raise BadInput(f"latents must be a dense tensor, got a {tensor.layout} one: pass tensor.to_dense()")
    _check_form(name, tensor.shape, tensor.dtype)  # already in memory: nothing of their size to read
    return Latents(tensor=_checked(tensor.detach(), Path(name)), fps=None, path=Path(name))


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours some of its messages
    return text.splitlines()[0] if text else type(e).__name__


def _stored_fps(value, path: Path) -> tuple[float | None, str | None]:
    """The stored fps as a number in 0.1..1000, or None with the reason (a bad one only matters without --fps)."""
    if value is None:
        return None, None
    try:
        fps = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except (ValueError, OverflowError):
        fps = None
    if fps is not None and 0.1 <= fps <= 1000:  # also false for NaN; the range EncodeOptions takes
        return fps, None
    return None, (f"{str(path)!r}: the stored fps must be a number in 0.1..1000, got {value!r:.40}; pass --fps to"
                  " override it")


def _check_form(name: str, shape, dtype: torch.dtype | str) -> tuple[int, ...]:
    """A float dtype, [C, T, H, W] or [B, C, T, H, W], no empty dimension."""
    shape = tuple(int(n) for n in shape)
    if dtype not in _FLOATS:
        raise BadInput(f"{name!r}: latents must be float32, float16 or bfloat16, got"
                       f" {str(dtype).removeprefix('torch.')}")
    if len(shape) not in (4, 5):
        raise BadInput(f"{name!r}: latents must be [C, T, H, W] or [B, C, T, H, W], got shape {list(shape)}")
    if min(shape) < 1:
        raise BadInput(f"{name!r}: latents have an empty dimension, shape {list(shape)}")
    return shape


def check_declared(name: str, shape, dtype: torch.dtype | str, *,
                   fix: str = "if the file is not damaged, split it into smaller files") -> None:
    """Latents' declared shape and dtype (from a file's header, before anything of that size is read or allocated):
    `_check_form`, and room in host memory to read them."""
    shape = _check_form(name, shape, dtype)
    size = math.prod(shape) * dtype.itemsize
    have = host_available()
    if 3 * size > have:  # read, made dense and checked: about three copies at once
        raise BadInput(f"{name!r}: latents of shape {list(shape)} {str(dtype).removeprefix('torch.')} take"
                       f" {gib(size)}, too much for the {gib(have)} of memory available here: {fix}")


def _from_torch(path: Path) -> tuple[torch.Tensor, object, dict]:
    # torch.save writes a zip archive; torch.load allocates each entry at its declared unpacked size, and the legacy
    # format at sizes its header declares: only the zip format is read, after its sizes are checked.
    if not zipfile.is_zipfile(path):
        raise BadInput(f"could not read latents from {str(path)!r}: the file is truncated, not a .pt file, or in"
                       " PyTorch's legacy format (before 1.6), which vaepipe does not read: re-save it with"
                       " torch.save")
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(entry.file_size for entry in archive.infolist())
    if 2 * unpacked > host_available():
        raise BadInput(f"{str(path)!r} unpacks to {gib(unpacked)}, too much for the {gib(host_available())} of"
                       " memory available here: if the file is not damaged, split it into smaller files")
    # weights_only: a hostile pickle is refused by torch's restricted unpickler instead of being executed.
    with _parsing():
        obj = torch.load(path, map_location="cpu", weights_only=True)
    fps, metadata = None, {}
    if isinstance(obj, dict) and isinstance(obj.get("latents"), torch.Tensor):
        # Plain values beside the latents (prompt, seed, model…) say what made them; tensors and the fps do not.
        metadata = {k: v for k, v in obj.items() if k not in ("latents", "fps") and _is_plain(v)}
        obj, fps = obj["latents"], obj.get("fps")
    elif not isinstance(obj, torch.Tensor):
        raise BadInput(f"{str(path)!r} holds a {type(obj).__name__}, not latents: save a tensor, or a dict with a"
                       " 'latents' tensor and an optional 'fps'")
    if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided or obj.device.type != "cpu":
        raise BadInput(f"{str(path)!r} holds a {obj.layout} {type(obj).__name__} on {obj.device}, not plain latents:"
                       " save a dense tensor (tensor.contiguous().cpu())")
    check_declared(str(path), obj.shape, obj.dtype)
    # Only now, with the size known to fit: stride-0 (expanded), overlapping or sliced tensors become dense.
    return obj.detach().clone(memory_format=torch.contiguous_format), fps, metadata


def _from_numpy(path: Path) -> torch.Tensor:
    import numpy as np
    from numpy.lib import format as npy

    with open(path, "rb") as f, _parsing():
        version = npy.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
        data_at = f.tell()
    native = {2: torch.float16, 4: torch.float32} if dtype.kind == "f" and dtype.fields is None else {}
    check_declared(str(path), shape, native.get(dtype.itemsize, dtype.name))
    need = math.prod(shape) * dtype.itemsize
    if path.stat().st_size - data_at < need:
        raise ValueError(f"its header declares {gib(need)} of data but it holds {gib(path.stat().st_size - data_at)}")
    with _parsing():
        array = np.load(path, allow_pickle=False)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


@contextlib.contextmanager
def _parsing() -> Iterator[None]:
    """Around a third-party parser reading a file that may be hostile: whatever it raises (numpy's header parser
    raises tokenize and syntax errors, torch's unpickler type and index errors) is a damaged file."""
    try:
        yield
    except (BadInput, pickle.UnpicklingError):
        raise
    except Exception as e:  # noqa: BLE001 - the file's fault whatever the parser's error type
        raise ValueError(_first_line(e)) from None


def _number(text: str | None) -> float | str | None:
    """Metadata holds strings: the number in one, or the string itself (which `_stored_fps` then refuses)."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return text


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _check_slice(f, key: str, name: str) -> None:
    """A safetensors tensor's declared shape and dtype, before it is read."""
    tensor = f.get_slice(key)
    check_declared(name, tensor.get_shape(), _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype()))


def _is_plain(value) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, str | int | float | bool) for v in value)
    return isinstance(value, str | int | float | bool)


def _from_safetensors(path: Path) -> tuple[torch.Tensor, object, dict]:
    from safetensors import safe_open

    with _parsing(), safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        key = "latents" if "latents" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise BadInput(f"{str(path)!r} holds tensors {keys}: name the latents 'latents'")
        stored = f.metadata() or {}
        # "format" is what safetensors writers note about themselves, not what made the latents.
        metadata = {k: v for k, v in stored.items() if k not in ("fps", "format")}
        _check_slice(f, key, str(path))
        return f.get_tensor(key), _number(stored.get("fps")), metadata


def _settings(stored: dict, path: Path) -> dict[str, float]:
    """decode_timestep / decode_noise_scale stored with the latents, checked as the options are."""
    settings = {}
    for key in ("decode_timestep", "decode_noise_scale"):
        if stored.get(key) is not None:
            try:
                settings[key] = float(stored[key])
            except (TypeError, ValueError):
                raise BadInput(f"{str(path)!r}: the stored {key} {stored[key]!r} is not a number") from None
            if not 0.0 <= settings[key] <= 1.0:
                raise BadInput(f"{str(path)!r}: the stored {key} must be in 0..1, got {settings[key]}; pass"
                               f" --{key.replace('_', '-')} to override")
    return settings


# ComfyUI's LATENT values are in the VAE's own space: its samplers apply the model's latent format
# (`process_latent_out`: for Wan, `z * std + mean`, the very constants of diffusers' Wan VAE config) before they
# return, and its VAEDecode decodes them as they are. So a .latent decodes with no denormalisation, for the
# families whose ComfyUI VAE takes the same latents as diffusers' (checked for Wan 2.1 and 2.2).
COMFYUI_CHANNELS = {16: "Wan 2.1", 48: "Wan 2.2 TI2V-5B"}
_COMFYUI_MARKER = "latent_format_version_"


def _from_comfyui(path: Path) -> tuple[torch.Tensor, dict]:
    """A .latent from ComfyUI's SaveLatent: safetensors with `latent_tensor` and a `latent_format_version_0` marker,
    the workflow as JSON in the metadata (`prompt`: the graph it ran, `workflow`: the editor's)."""
    from safetensors import safe_open

    name = str(path)
    with _parsing(), safe_open(name, framework="pt") as f:
        keys = set(f.keys())
        stored = f.metadata() or {}
        if "latent_tensor" not in keys:
            raise BadInput(f"{name!r} is not a ComfyUI latent: it has no 'latent_tensor' (it holds"
                           f" {sorted(keys)}); save it with ComfyUI's SaveLatent node")
        versions = sorted(k.removeprefix(_COMFYUI_MARKER) for k in keys if k.startswith(_COMFYUI_MARKER))
        if not versions:
            raise BadInput(f"{name!r} has no latent_format_version_0 marker: it is a pre-2023 Stable Diffusion"
                           " image latent, not a video one; save the video latents with a current ComfyUI")
        if "0" not in versions:
            raise BadInput(f"{name!r} is a ComfyUI latent of format version {', '.join(versions)}, which vaepipe"
                           " does not know (it reads version 0): update vaepipe, or save it with SaveLatent"
                           " from a ComfyUI that writes version 0")
        _check_slice(f, "latent_tensor", name)
        tensor = f.get_tensor("latent_tensor")
    if tensor.dim() != 5:
        raise BadInput(f"{name!r} holds {tuple(tensor.shape)} latents: an image latent, not a video one (ComfyUI"
                       " video latents are [B, C, T, H, W])")
    channels = tensor.shape[1]
    if channels not in COMFYUI_CHANNELS:
        known = ", ".join(f"{c} ({family})" for c, family in COMFYUI_CHANNELS.items())
        raise BadInput(f"{name!r} holds ComfyUI latents with {channels} channels: vaepipe knows what ComfyUI does"
                       f" before VAEDecode only for {known}; decode these in ComfyUI")
    # ComfyUI's LoadLatent hands them on as float32; the workflow's JSON is kept as JSON, not as a quoted string.
    return tensor.float(), {k: _json_or_text(v) for k, v in stored.items() if v}


def _json_or_text(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict | list) else text


def _checked(t: torch.Tensor, path: Path) -> torch.Tensor:
    """Dense latents whose declared shape and dtype passed `check_declared`: [B, C, T, H, W], finite."""
    if t.dim() == 4:
        t = t.unsqueeze(0)
    # In slices: isfinite's temporaries are several times their input, and a sum over bools widens to int64.
    bad = sum(int(torch.isfinite(part).logical_not_().sum()) for part in t.reshape(-1).split(1 << 22))
    if bad:
        raise BadInput(f"{str(path)!r}: latents contain {bad} NaN or Inf values: the diffusion run that made them"
                       " diverged; regenerate them")
    return t


def check_for_vae(latents: Latents, z_dim: int) -> None:
    from .families import vaes_with

    channels = latents.tensor.shape[1]
    if channels != z_dim:
        fits = vaes_with(channels)
        raise BadInput(f"{str(latents.path)!r}: latents have {channels} channels but the VAE expects {z_dim}"
                       f" (z_dim); pass the matching --vae"
                       + (f": {channels} channels are those of {fits}" if fits else ""))


def denormalize(z: torch.Tensor, config) -> torch.Tensor:
    """Undo the pipeline's latent normalisation with the same arithmetic, in the same dtype, as diffusers' Wan
    pipeline before `vae.decode`: `z / (1 / std) + mean`."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1, 1)
        latents_mean = torch.tensor(mean).view(shape).to(z.device, z.dtype)
        latents_std = 1.0 / torch.tensor(std).view(shape).to(z.device, z.dtype)
        return z / latents_std + latents_mean
    scaling = config.get("scaling_factor")
    if scaling is None:
        raise BadInput("this VAE's config has neither latents_mean/std nor scaling_factor: pass --no-denormalize"
                       " if the latents are already raw")
    z = z / scaling
    shift = config.get("shift_factor")
    return z + shift if shift else z


def parse_size(text: str, *, name: str = "size") -> tuple[int, int, int]:
    """HEIGHTxWIDTHxFRAMES, such as 480x832x81, as three positive integers."""
    try:
        height, width, frames = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadInput(f"{name} must be HEIGHTxWIDTHxFRAMES such as 480x832x81, got {text!r}") from None
    if min(height, width, frames) < 1:
        raise BadInput(f"{name} {text!r} has an empty dimension")
    return height, width, frames


# The preset whose latents `--channels` alone names: only Wan's widths say which VAE (and so which compression).
_PRESET_OF_CHANNELS = {16: "random:wan2.1", 48: "random:wan2.2"}


def synthetic_preset(*, channels: int | None = None, vae: str | None = None) -> str:
    """The random-weight preset whose geometry synthetic latents follow: `vae` itself (a preset name), else Wan's
    for 16 or 48 `channels` (16 when neither is given)."""
    from .families import PRESET_NAMES, PRESETS, preset_channels

    if vae is not None:
        if vae not in PRESETS:
            raise BadInput(f"synthetic latents follow a preset's geometry: --vae takes random:<family>[-tiny]"
                           f" ({PRESET_NAMES}), got {vae!r}")
        if channels is not None and channels != preset_channels(vae):
            raise BadInput(f"--channels {channels} does not fit --vae {vae}, whose latents have"
                           f" {preset_channels(vae)} channels: leave --channels out")
        return vae
    channels = 16 if channels is None else channels
    if channels in _PRESET_OF_CHANNELS:
        return _PRESET_OF_CHANNELS[channels]
    fits = [name for name in PRESETS if preset_channels(name) == channels]
    raise BadInput(f"--channels {channels} alone does not say which VAE (its compression sets the latent size): pass"
                   f" --vae {' or '.join(fits) if fits else 'random:<family>[-tiny]'} in its place")


def synthetic_shape(size: str, *, channels: int | None = None, vae: str | None = None,
                    batch: int = 1) -> tuple[int, ...]:
    """The shape [B, C, T, H, W] of latents that decode to `size` (HEIGHTxWIDTHxFRAMES) with the preset
    `synthetic_preset` picks (its channels, spatial and temporal compression), checked to fit in memory before
    anything is allocated."""
    from . import families
    from .names import WAN_GEOMETRY

    preset = synthetic_preset(channels=channels, vae=vae)
    if preset in WAN_GEOMETRY:  # (no diffusers to import: seconds)
        z, scale, temporal = WAN_GEOMETRY[preset]
        height, width, frames = parse_size(size)
        if height % scale or width % scale or (frames - 1) % temporal:
            raise BadInput(f"size {size} does not fit the VAE (Wan 2.1 / 2.2): height and width must be multiples of"
                           f" {scale}, frames a count it decodes to (5, 9, 17, 33…)")
        shape = (batch, z, (frames - 1) // temporal + 1, height // scale, width // scale)
    else:
        family, config = families.PRESETS[preset]
        with torch.device("meta"):
            model = family.build(config)
        shape = (batch, *families.synthetic_shape(model, size)[1:])
    check_declared(f"size {size}", shape, torch.float32, fix="use a smaller size")
    return shape


def synthetic_latents(size: str, *, channels: int | None = None, vae: str | None = None, batch: int = 1,
                      seed: int = 0) -> torch.Tensor:
    """N(0, 1) latents of `synthetic_shape`, as a diffusers pipeline with output_type="latent" leaves them."""
    shape = synthetic_shape(size, channels=channels, vae=vae, batch=batch)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_synthetic(path: str | Path, *, size: str, channels: int | None = None, vae: str | None = None,
                    batch: int = 1, fps: float = 16.0, seed: int = 0) -> tuple[int, ...]:
    """Write `synthetic_latents` to `path` (.pt with the fps, .safetensors, .npy, or a ComfyUI .latent, in the VAE's
    own space as ComfyUI's samplers leave them); return their shape."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".pth", ".safetensors", ".npy", ".latent"):
        raise BadInput(f"cannot write latents to {str(path)!r}: use .pt, .safetensors, .npy or .latent (ComfyUI)")
    preset = synthetic_preset(channels=channels, vae=vae)
    comfyui = _comfyui_latent_format(preset) if suffix == ".latent" else None  # refused before any work
    latents = synthetic_latents(size, vae=preset, batch=batch, seed=seed)
    shape = tuple(latents.shape)
    if comfyui:
        latents = comfyui(latents)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".pt", ".pth"):
        torch.save({"latents": latents, "fps": fps}, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"latents": latents}, str(path), metadata={"fps": str(fps)})
    elif suffix == ".npy":
        import numpy as np

        np.save(path, latents.numpy())
    else:
        from safetensors.torch import save_file

        # What ComfyUI's SaveLatent writes: the samples and an empty version marker (no workflow: none ran).
        save_file({"latent_tensor": latents.contiguous(), f"{_COMFYUI_MARKER}0": torch.tensor([])}, str(path))
    return shape


def _comfyui_latent_format(preset: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a ComfyUI sampler does to what a diffusers pipeline leaves as `z` before handing it on: the Wan latent
    format's process_latent_out, `z * std / 1.0 + mean` in float32 (the VAE's own space, which VAEDecode takes as
    it is)."""
    from .families import PRESETS

    family, config = PRESETS[preset]
    if not family.label.startswith("Wan"):  # the only latent format vaepipe reads .latent files of
        known = ", ".join(f"{c} ({name})" for c, name in COMFYUI_CHANNELS.items())
        raise BadInput(f"vaepipe reads ComfyUI .latent files only for {known}: write {preset}'s latents as .pt,"
                       " .safetensors or .npy")
    with torch.device("meta"):
        model_config = family.build(config).config
    shape = (1, model_config.z_dim, 1, 1, 1)
    std = torch.tensor(model_config.latents_std).view(shape)
    mean = torch.tensor(model_config.latents_mean).view(shape)
    return lambda z: z.float() * std / 1.0 + mean
