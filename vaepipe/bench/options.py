"""What a benchmark run times: its options and the clip shapes."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encode import CODECS, EncodeOptions, plan_encode
from ..errors import BadInput
from ..families import PRESETS, synthetic_shape
from ..latents import parse_size
from ..runner import DEFAULT_FPS, DecodeOptions
from .content import CONTENTS, photograph_folder

# The names live here, the jobs they run in modes.py (which reads the options): one way, no import circle.
MODES = ("naive", "fastvae", "sync", "pipelined", "exact", "decode", "encode")
DEFAULT_MODES = ("naive", "sync", "pipelined", "exact")
DEFAULT_VAE, DEFAULT_SHAPES, DEFAULT_RUNS = "random:wan2.1", ("480x832x81", "720x1280x81"), 5


# Without a GPU: what `make bench` times, in well under a minute on two cores (full size takes hours there).
CPU_VAE, CPU_SHAPE, CPU_RUNS = "random:wan2.1-tiny", "48x80x17", 3


def bench_defaults(device: str | None, vae: str | None, shape: str | None,
                   runs: int | None) -> tuple[str, tuple[str, ...], int, str | None]:
    """The VAE, shapes and runs to time where the command line leaves them out, and a note saying what was chosen:
    on a GPU the released sizes; on the CPU (none there, or --device cpu) the tiny settings, or for a given preset
    a small shape it decodes, since a 480p or 720p decode there takes hours. A VAE that is not a preset, on the CPU
    without --shape, is refused with the command to run."""
    on_cpu = (device or "").startswith("cpu") or (device is None and not torch.cuda.is_available())
    if not on_cpu or shape is not None:
        return (vae or DEFAULT_VAE, _shapes(shape) if shape is not None else DEFAULT_SHAPES,
                DEFAULT_RUNS if runs is None else runs, None)
    if vae is None:
        vae, shape = CPU_VAE, CPU_SHAPE
    elif vae in PRESETS:
        shape = small_shape(vae)
    else:
        raise BadInput(f"no GPU here: the default shapes ({','.join(DEFAULT_SHAPES)}) take hours on the CPU; pass a"
                       f" small --shape the VAE decodes, or try `{cpu_command()}`")
    runs = CPU_RUNS if runs is None else runs
    note = (f"no GPU: timing small CPU settings (--vae {vae} --shape {shape} --runs {runs}; full-size shapes take"
            " hours on a CPU: pass --shape to choose)")
    return vae, (shape,), runs, note


def cpu_command() -> str:
    return f"vaepipe bench --device cpu --vae {CPU_VAE} --shape {CPU_SHAPE} --runs {CPU_RUNS}"


def small_shape(preset: str) -> str:
    """A small size that `preset` decodes: 6 x 10 latent pixels, 5 latent frames (48x80x17 for Wan)."""
    family, config = PRESETS[preset]
    with torch.device("meta"):
        model = family.build(config)
    scale = family.spatial_factor(model)
    return f"{6 * scale}x{10 * scale}x{family.num_frames(model, 5)}"


def _shapes(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def default_modes(device: str | None) -> tuple[str, ...]:
    """DEFAULT_MODES, and fastvae where it is installed and the bench runs on a GPU."""
    gpu = device != "cpu" and torch.cuda.is_available()
    return DEFAULT_MODES + (("fastvae",) if gpu and importlib.util.find_spec("fastvae") else ())


@dataclass(kw_only=True, slots=True)
class BenchOptions:
    vae: str = DEFAULT_VAE
    """The VAE to time (a preset, a folder, a cached repo id or a checkpoint)."""
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    """Video sizes HEIGHTxWIDTHxFRAMES; synthetic N(0, 1) latents of the matching latent size."""
    dtype: str | None = None
    """bf16, fp16 or fp32; None: bf16 on CUDA, fp32 on the CPU."""
    device: str | None = None
    """cuda, cuda:N or cpu; None: cuda when there is one."""
    runs: int = DEFAULT_RUNS
    """Timed runs per mode and shape, after one warm-up."""
    modes: tuple[str, ...] = DEFAULT_MODES
    """Which of MODES to run (default naive, sync, pipelined; decode and encode time one lane alone)."""
    content: tuple[str, ...] = ("natural",)
    """What the encoder is given: natural frames (a pan over photographs, what a trained VAE's clip looks like to
    an encoder) or noise (what random weights decode to); both side by side."""
    codec: str = "h264"
    """The encoder for every mode but naive (which is diffusers' export_to_video)."""
    encoders: tuple[int | str, ...] = ("auto",)
    """--encoders values to compare (e.g. 1 and auto), each its own table."""
    chunk: int | None = None
    """Latent frames per decoder call (None: the engine's choice from free memory; diffusers' decoder 1)."""
    buffers: int = 2
    """Slots per lane (pipelined)."""
    out: Path = Path("bench")
    """Where bench.json, bench.md, the videos, traces and plots go."""
    trace: bool = False
    """Write a Chrome/Perfetto trace per shape and mode."""
    plot: bool = False
    """Write a PNG timeline per shape (needs matplotlib)."""
    profile: bool = True
    """One extra run per mode under the torch profiler for GPU kernel utilization (CUDA only)."""
    crf: int = 18
    """libx264 CRF for sync and pipelined."""
    preset: str = "medium"
    """libx264 preset for sync and pipelined: the encoder's lookahead is what the pipelined wall waits for last."""
    decoders: bool = True
    """Also time the decode lane alone, decoder against decoder (bench/decoders.py)."""
    one_shot: int | None = None
    """Fresh-process runs of the whole `vaepipe decode` command per shape (bench/oneshot.py); None: 3 on GPUs,
    none on the CPU."""
    fidelity: bool = False
    """In that table, PSNR and max abs difference against an fp32 decode with fp32 weights (loads the VAE twice)."""

    @property
    def encode(self) -> EncodeOptions:
        return self.encode_with(self.encoders[0])

    def encode_with(self, encoders: int | str) -> EncodeOptions:
        return EncodeOptions(codec=self.codec, crf=self.crf, preset=self.preset, encoders=encoders)

    @property
    def suffix(self) -> str:
        return {"prores": ".mov", "ffv1": ".mkv"}.get(self.codec, ".mp4")

    def __post_init__(self) -> None:
        if not 1 <= self.runs <= 100:
            raise BadInput(f"runs must be in 1..100, got {self.runs}")
        if self.one_shot is not None and not 0 <= self.one_shot <= 20:
            raise BadInput(f"one_shot must be in 0..20, got {self.one_shot}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes or len(set(self.modes)) != len(self.modes):
            raise BadInput(f"modes must be distinct names among {', '.join(MODES)}, got {','.join(self.modes)!r}")
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise BadInput(f"shapes must be distinct HEIGHTxWIDTHxFRAMES values, got {','.join(self.shapes)!r}")
        for shape in self.shapes:
            Shape.parse(shape)
        if self.vae in PRESETS:  # a preset's sizes are known: check the shapes fit it before it loads
            family, config = PRESETS[self.vae]
            with torch.device("meta"):
                model = family.build(config)
            for shape in self.shapes:
                synthetic_shape(model, shape)
        if not self.content or any(c not in CONTENTS for c in self.content) or len(set(self.content)) < len(
                self.content):
            raise BadInput(f"content must be natural, noise or both, got {','.join(self.content)!r}")
        if "natural" in self.content:
            photograph_folder()
        if self.codec == "png" or self.codec not in CODECS:
            raise BadInput(f"codec must be one of {', '.join(c for c in CODECS if c != 'png')}, got {self.codec!r}")
        if not self.encoders or len(set(self.encoders)) < len(self.encoders):
            raise BadInput(f"encoders must be distinct values, got {','.join(map(str, self.encoders))!r}")
        self.encoders = tuple(self.encode_with(e).encoders for e in self.encoders)
        DecodeOptions(vae=self.vae, dtype=self.dtype, device=self.device, chunk=self.chunk, buffers=self.buffers)
        plan_encode(f"check{self.suffix}", width=16, height=16, fps=DEFAULT_FPS, options=self.encode)
        if {"naive", "fastvae"} & set(self.modes) and importlib.util.find_spec("imageio") is None:
            raise BadInput("modes naive and fastvae run diffusers' export_to_video, which needs imageio: pip install"
                           " imageio (or 'vaepipe[naive]'), or leave them out of --modes")
        if "fastvae" in self.modes and importlib.util.find_spec("fastvae") is None:
            raise BadInput("mode fastvae needs fastvae: pip install fastvae (or 'vaepipe[peers]'), or leave it out"
                           " of --modes")
        if self.plot and importlib.util.find_spec("matplotlib") is None:
            raise BadInput("--plot needs matplotlib: pip install matplotlib (or 'vaepipe[plot]'), or drop --plot")

    def command(self, dtype: str) -> str:
        """The command line that repeats this benchmark."""
        parts = ["vaepipe bench", f"--vae {self.vae}", f"--shape {','.join(self.shapes)}", f"--dtype {dtype}",
                 f"--runs {self.runs}", f"--modes {','.join(self.modes)}", f"--out {self.out}"]
        if self.device:
            parts.append(f"--device {self.device}")
        if self.chunk:
            parts.append(f"--chunk {self.chunk}")
        if self.buffers != 2:
            parts.append(f"--buffers {self.buffers}")
        if (self.crf, self.preset) != (18, "medium"):
            parts.append(f"--crf {self.crf} --preset {self.preset}")
        if self.codec != "h264":
            parts.append(f"--codec {self.codec}")
        parts.append(f"--content {'both' if len(self.content) == 2 else self.content[0]}")
        if self.encoders != ("auto",):
            parts.append(f"--encoders {','.join(map(str, self.encoders))}")
        if self.one_shot is not None:
            parts.append(f"--one-shot {self.one_shot}")
        parts += [flag for flag, on in (("--trace", self.trace), ("--plot", self.plot),
                                        ("--no-profile", not self.profile), ("--no-decoders", not self.decoders),
                                        ("--fidelity", self.fidelity)) if on]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Shape:
    height: int
    width: int
    frames: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        return cls(*parse_size(text, name="shape"))

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

