"""Loading the VAE: a random-weight preset, a diffusers folder, a Hub repo id from the local cache only, or one
checkpoint file as Wan and ComfyUI ship it."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families
from .errors import BadInput

# Random-weight presets of every family (random:<family>, random:<family>-tiny), named so that nobody mistakes them
# for a trained model; families/ holds their configs.
PRESETS = families.PRESETS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(slots=True)
class LoadedVae:
    model: torch.nn.Module
    source: str
    """What was loaded, for the user: a preset (said to be random), a folder, a repo id or a file."""

    @property
    def is_wan(self) -> bool:
        from diffusers import AutoencoderKLWan

        return isinstance(self.model, AutoencoderKLWan)

    @property
    def family(self) -> families.Family:
        return families.family_of(self.model)

    @property
    def z_dim(self) -> int:
        return self.family.z_dim(self.model)

    @property
    def temporal_factor(self) -> int:
        return self.family.temporal_factor(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_vae(src: str, *, dtype: torch.dtype, device: torch.device) -> LoadedVae:
    """Load `src` onto `device` in `dtype`, in eval mode. Never touches the network."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    # diffusers' load-time advice (install accelerate; `.to` and fp32 modules) is not for our users: errors only.
    logging.set_verbosity_error()
    try:
        return _load(src, dtype, device)
    finally:
        logging.set_verbosity(level)


def _load(src: str, dtype: torch.dtype, device: torch.device) -> LoadedVae:
    if src.startswith("random:"):
        if src not in PRESETS:
            # checked again for library use
            raise BadInput(f"unknown preset {src!r}: use random:NAME or random:NAME-tiny, NAME one of"
                           f" {families.PRESET_NAMES}")
        family, config = PRESETS[src]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random weights in every process, so runs are comparable
            model = family.build(config)
        return _ready(model, f"{src} (random weights, not a trained model)", dtype, device)
    path = Path(src).expanduser()
    if path.is_dir():
        return _ready(_from_folder(path, dtype), str(path), dtype, device)
    if path.is_file():
        return _ready(_from_single_file(path, dtype), str(path), dtype, device)
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return _ready(_from_folder(_cached_repo(src), dtype), f"{src} (local Hub cache)", dtype, device)
    raise BadInput(f"--vae {src!r} is neither a folder, a checkpoint file, a Hub repo id (org/name) nor a preset"
                   f" ({', '.join(PRESETS)})")


def _ready(model: torch.nn.Module, source: str, dtype: torch.dtype, device: torch.device) -> LoadedVae:
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedVae(model=model, source=source)


def _cached_repo(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise BadInput(f"{repo_id} is not in the local Hugging Face cache and vaepipe never downloads: fetch it"
                       f" first (hf download {repo_id} --include 'vae/*'), or pass --vae FOLDER") from None


def _from_folder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    import diffusers

    for candidate in (folder, folder / "vae"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                class_name = json.loads(config.read_text())["_class_name"]
            except (ValueError, KeyError):
                raise BadInput(f"{config} is not a diffusers model config (no _class_name)") from None
            cls = getattr(diffusers, class_name, None)
            if cls is None or not class_name.startswith("Autoencoder"):
                continue  # a pipeline's model_index.json sits beside other configs; look in vae/
            try:
                return cls.from_pretrained(candidate, torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise BadInput(f"could not load the VAE in {candidate}: {e}") from None
    raise BadInput(f"{folder} holds no diffusers VAE: expected config.json of an Autoencoder* class there or in"
                   " vae/; pass the VAE folder or the pipeline folder")


def _from_single_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A Wan VAE checkpoint (the original release, ComfyUI's, or diffusers' own keys), mapped through diffusers'
    single-file loader with the matching config written locally, so nothing is fetched."""
    from diffusers import AutoencoderKLWan

    if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".ckpt"):
        raise BadInput(f"{path} is not a checkpoint: expected .safetensors, .pth, .pt or .ckpt")
    z_dim = _checkpoint_z_dim(path)
    # Keys left out of config.json take the class defaults, which are Wan 2.1's.
    config = {"_class_name": "AutoencoderKLWan", **(families.wan.WAN22 if z_dim == 48 else {})}
    with tempfile.TemporaryDirectory(prefix="vaepipe-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            return AutoencoderKLWan.from_single_file(str(path), config=tmp, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise BadInput(f"could not load {path} as a Wan VAE checkpoint: {e}") from None


def _checkpoint_z_dim(path: Path) -> int:
    """Wan 2.1 and 2.2 VAEs differ in latent width; read it off the post-quant conv without loading everything."""
    keys = ("conv2.weight", "post_quant_conv.weight")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(keys) and _is_post_quant(f.get_slice(name).get_shape()):
                        return int(f.get_slice(name).get_shape()[0])
        else:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            for name, tensor in state.items():
                if name.endswith(keys) and _is_post_quant(list(tensor.shape)):
                    return int(tensor.shape[0])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise BadInput(f"could not read {path} as a checkpoint: {e}") from None
    raise BadInput(f"{path} does not look like a Wan VAE checkpoint (no post-quant conv found): pass a diffusers"
                   " folder with --vae instead")


def _is_post_quant(shape: list[int]) -> bool:
    # A square 1x1x1 conv: residual blocks' conv2 layers have 3x3x3 kernels.
    return len(shape) == 5 and shape[0] == shape[1] and shape[2:] == [1, 1, 1]
