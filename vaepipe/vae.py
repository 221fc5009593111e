"""Loading the VAE: a random-weight preset, a diffusers folder, a Hub repo id from the local cache only, or one
checkpoint file as Wan and ComfyUI ship it."""

from __future__ import annotations

import inspect
import json
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families
from .errors import BadInput
from .files import refused_pickle, regular_file

# Random-weight presets of every family (random:<family>, random:<family>-tiny), named so that nobody mistakes them
# for a trained model; families/ holds their configs.
PRESETS = families.PRESETS
_CHECKPOINT_FIX = "use the checkpoint as .safetensors, or one whose file holds tensors only"
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
    from . import startup

    startup.import_diffusers()
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
        gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus, device_type="cuda"):
            torch.manual_seed(0)  # the same random weights in every process, so runs are comparable
            # Built where it runs, with torch's own initialisation there (the default scale of every layer, so bf16
            # decodes stay finite): Wan 2.1's took 4.5 s on an H100 machine when built on the CPU and copied over.
            with torch.device(device):
                model = family.build(config)
        return _ready(model, f"{src} (random weights, not a trained model)", dtype, device)
    path = Path(src).expanduser()
    if path.is_dir():
        return _ready(_from_folder(path, dtype, device), str(path), dtype, device)
    if path.exists():
        regular_file(path, "--vae", "pass a checkpoint file (.safetensors, .pth, .pt, .ckpt) or a diffusers folder")
        return _ready(_from_single_file(path, dtype), str(path), dtype, device)
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return _ready(_from_folder(_cached_repo(src), dtype, device), f"{src} (local Hub cache)", dtype, device)
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
                       f" first (hf download {repo_id} --include 'vae/*'), or pass --vae FOLDER; to try vaepipe"
                       f" without weights, --vae {_stand_in(repo_id)} (random weights: the video is noise)") from None


def _stand_in(repo_id: str) -> str:
    """A random-weight preset that decodes the same latents as `repo_id`'s VAE (its tiny one where it has those
    channels), for a try without the weights."""
    for family in families.FAMILIES:
        for channels, repo in family.default_repos.items():
            if repo == repo_id:
                fits = [n for n in family.presets if families.preset_channels(n) == channels]
                return next((n for n in fits if n.endswith("-tiny")), fits[0])
    return "random:wan2.1-tiny"


def _from_folder(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import diffusers

    for candidate in (folder, folder / "vae"):
        config = candidate / "config.json"
        if config.exists():
            regular_file(config, "the VAE config", "replace it with the model's config.json")
            for weights in (*candidate.glob("*.safetensors"), *candidate.glob("*.bin")):
                regular_file(weights, "the VAE weights", "replace it with the model's weights file")
            try:
                settings = json.loads(config.read_text())
            except (ValueError, OSError):
                raise BadInput(f"{config} is not a diffusers model config (not JSON text)") from None
            if not isinstance(settings, dict):
                raise BadInput(f"{config} must hold a JSON object of the VAE's settings, got a"
                               f" {type(settings).__name__}: replace it with the model's config.json")
            class_name = settings.get("_class_name")
            if class_name is None:
                raise BadInput(f"{config} is not a diffusers model config (no _class_name)")
            if not isinstance(class_name, str):
                raise BadInput(f"{config}: _class_name must be a class name such as \"AutoencoderKLWan\", got"
                               f" {class_name!r}")
            cls = getattr(diffusers, class_name, None)
            if cls is None or not class_name.startswith("Autoencoder"):
                continue  # a pipeline's model_index.json sits beside other configs; look in vae/
            check_config_types(cls, settings, config)
            model = _straight_to_device(cls, candidate, settings, dtype, device)
            if model is not None:
                check_weights(model, str(candidate))  # (the keys and shapes are the model's: its values)
                return model
            try:
                model, info = cls.from_pretrained(candidate, torch_dtype=dtype, local_files_only=True,
                                                  output_loading_info=True, ignore_mismatched_sizes=True)
            except (OSError, ValueError, RuntimeError, TypeError, AttributeError, KeyError, IndexError) as e:
                # Types are checked above where the class's defaults tell them; what they do not cover lands here.
                raise BadInput(f"could not load the VAE in {candidate}: {_first_line(e)}") from None
            check_weights(model, str(candidate), missing=info["missing_keys"], unexpected=info["unexpected_keys"],
                          mismatched=info["mismatched_keys"])
            return model
    raise BadInput(f"{folder} holds no diffusers VAE: expected config.json of an Autoencoder* class there or in"
                   " vae/; pass the VAE folder or the pipeline folder")


def _straight_to_device(cls: type, folder: Path, settings: dict, dtype: torch.dtype,
                        device: torch.device) -> torch.nn.Module | None:
    """The model with its weights read once, straight onto `device` in `dtype`, its modules built on the meta device
    (nothing initialised, nothing copied from the host after); None where diffusers' own loader must run: sharded or
    .bin weights, keys or shapes other than the model's, buffers, modules kept in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = list(folder.glob("*.safetensors"))
    if len(files) != 1 or getattr(cls, "_keep_in_fp32_modules", None):
        return None
    with torch.device("meta"):
        model = cls.from_config(settings)
    if next(model.buffers(), None) is not None:
        return None
    try:
        state = load_file(files[0], device=str(device))
    except (OSError, SafetensorError):
        return None  # diffusers' loader says what is wrong with the file
    want = model.state_dict()
    if state.keys() != want.keys() or any(state[k].shape != want[k].shape for k in want):
        return None
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return model


def check_config_types(cls: type, settings: dict, config: Path) -> None:
    """Each setting of the JSON type its default in `cls.__init__` has (a size a number, a list of sizes a list of
    numbers): diffusers builds the model from them unchecked, and a string for a size fails deep inside torch."""
    for name, param in inspect.signature(cls.__init__).parameters.items():
        default, value = param.default, settings.get(name)
        if name not in settings or default is inspect.Parameter.empty or default is None or value is None:
            continue
        want, got = _json_type(default), _json_type(value)
        if {want, got} == {"a number", "a list"}:
            continue  # many classes take one size for every block, or one per block
        items = {_json_type(v) for v in default} if isinstance(default, list | tuple) else set()
        if got != want or (len(items) == 1 and any(_json_type(v) not in items for v in value)):
            raise BadInput(f"{config}: {name} must be {want}{f' of {_PLURAL[items.pop()]}' if len(items) == 1 else ''}"
                           f" (such as {json.dumps(default)}), got {json.dumps(value)[:60]}: replace it with the"
                           " model's config.json")


_PLURAL = {"true or false": "true/false values", "a number": "numbers", "a string": "strings", "a list": "lists",
           "an object": "objects", "null": "nulls"}


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list", tuple: "a list", dict: "an object"}.get(type(value), "null")


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
        _check_single_file(path, tmp)
        try:
            model = AutoencoderKLWan.from_single_file(str(path), config=tmp, torch_dtype=dtype, local_files_only=True)
        except pickle.UnpicklingError as e:
            raise refused_pickle(path, e, _CHECKPOINT_FIX) from None
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise BadInput(f"could not load {path} as a Wan VAE checkpoint: {_first_line(e)}") from None
    check_weights(model, str(path))
    return model


def _check_single_file(path: Path, config_dir: str) -> None:
    """The file's tensor names and shapes, mapped as diffusers' single-file loader maps them, against the model the
    config makes: all on the meta device, from the file's header, before any weight is read. (The loader itself
    leaves missing parameters at their random initial values, and lists every mismatch on a line of its own.)"""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(config_dir))
    expected = model.state_dict()
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                found = {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in f.keys()}
        else:
            found = torch.load(path, map_location="meta", weights_only=True, mmap=True)
            while isinstance(found, dict) and isinstance(found.get("state_dict"), dict):
                found = found["state_dict"]
            found = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
        if found.keys() != expected.keys():  # not diffusers' names: map them as from_single_file would
            convert = SINGLE_FILE_LOADABLE_CLASSES["AutoencoderKLWan"]["checkpoint_mapping_fn"]
            found = convert(config=dict(model.config), checkpoint=found)
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e, _CHECKPOINT_FIX) from None
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise BadInput(f"could not read {path} as a checkpoint: {_first_line(e)}") from None
    shared = expected.keys() & found.keys()
    check_weights(model, str(path), missing=expected.keys() - found.keys(), unexpected=found.keys() - expected.keys(),
                  mismatched=[(k, tuple(found[k].shape), tuple(expected[k].shape)) for k in shared
                              if found[k].shape != expected[k].shape])


def check_weights(model: torch.nn.Module, source: str, *, missing=(), unexpected=(), mismatched=()) -> None:
    """Refuse (BadInput) weights that do not make this VAE: parameters the file lacks (diffusers only logs them and
    leaves them uninitialised or random: a partial download would decode to garbage), tensors in the file that are
    not its parameters, tensors of another shape, or NaN/Inf values. Meta tensors are not checked for values."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    problems = []
    if missing:
        problems.append(f"parameters missing from the file: {len(missing)} of {len(tensors)} ({_first(missing)})")
    if unexpected:
        problems.append(f"tensors in the file that are not its parameters: {len(unexpected)} ({_first(unexpected)})")
    if mismatched:
        shown = ", ".join(f"{k} is {list(a)}, not {list(b)}" for k, a, b in sorted(mismatched)[:2])
        problems.append(f"tensors of another shape in the file: {len(mismatched)} ({shown}"
                        f"{', …' if len(mismatched) > 2 else ''})")
    hint = "re-download them (a download cut short leaves tensors out), or pass the checkpoint of this VAE"
    if not problems:
        bad = [name for name, t in tensors.items() if t.device.type != "meta" and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]
        if bad:
            problems.append(f"parameters holding NaN or Inf: {len(bad)} of {len(tensors)} ({_first(bad)})")
            if any(t.dtype == torch.float16 for t in tensors.values()):
                hint = "in float16 these may be values beyond its range: try --dtype bf16; else " + hint
    if problems:
        raise BadInput(f"the VAE weights in {source} do not fit its config ({type(model).__name__}): "
                       + "; ".join(problems) + f": {hint}")


def _first(names, n: int = 2) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def _first_line(e: BaseException) -> str:
    """diffusers and torch errors can run to hundreds of lines (one per tensor): their first line, cut short."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:300] + "…"


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
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e, _CHECKPOINT_FIX) from None
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise BadInput(f"could not read {path} as a checkpoint: {e}") from None
    raise BadInput(f"{path} does not look like a Wan VAE checkpoint (no post-quant conv found): pass a diffusers"
                   " folder with --vae instead")


def _is_post_quant(shape: list[int]) -> bool:
    # A square 1x1x1 conv: residual blocks' conv2 layers have 3x3x3 kernels.
    return len(shape) == 5 and shape[0] == shape[1] and shape[2:] == [1, 1, 1]
