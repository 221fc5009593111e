"""The command line: thin commands over the shared runner. Only this module turns errors into exit codes.

Start-up: this module imports neither torch nor diffusers (seconds of imports), so that `--help` and argument errors
answer at once; a command imports what it needs when it runs, after a "loading…" line where that takes seconds."""

from __future__ import annotations

import json
import platform
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import __version__, startup
from .encode import CODECS
from .errors import BadInput, VaepipeError
from .helptext import Command, Group
from .names import PRESET_STEMS
from .stop import MESSAGE, exit_interrupted, terminate

if TYPE_CHECKING:
    from .progress import Reporter

_told_interrupted = False


def stops() -> tuple[type[BaseException], ...]:
    """What a command turns into a sentence and an exit code. Running out of memory should not happen before the
    decode (sizes are checked before anything of their size is allocated), but where it does (bench's whole-clip
    naive decode, a GPU that other work filled meanwhile) it is a failure to report, not a traceback. (torch's own
    out-of-memory error only where torch is loaded: nothing else can raise it.)"""
    torch = sys.modules.get("torch")
    return (VaepipeError, KeyboardInterrupt, MemoryError, *((torch.OutOfMemoryError,) if torch else ()))


app = typer.Typer(
    cls=Group,
    name="vaepipe",
    help="Decode video-diffusion latents into video: exact, overlapped, bounded memory.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: Rich's tables squeeze descriptions at 80 columns, and cost an import
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vaepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    pass


def fail(error: BaseException, reporter: Reporter | None = None) -> typer.Exit:
    """Show an error as one sentence on stderr and give the exit code: 2 bad input, 1 failure, 130 Ctrl-C."""
    from rich.console import Console

    global _told_interrupted
    console = reporter.progress.console if reporter and not reporter.quiet else Console(stderr=True)
    if isinstance(error, KeyboardInterrupt):
        console.print(MESSAGE, style="red", highlight=False, markup=False)
        _told_interrupted = True
        return typer.Exit(130)
    torch = sys.modules.get("torch")
    if isinstance(error, MemoryError) or torch and isinstance(error, torch.OutOfMemoryError):
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "an allocation failed"
        error = VaepipeError(f"out of memory ({detail}): free memory, or decode smaller latents")
    # Control characters (from a file name, say) are shown escaped, never sent to the terminal.
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(error))
    console.print(f"error: {text}", style="red", highlight=False, markup=False)
    return typer.Exit(error.exit_code)


# Options shared by decode and batch, under the same names (dashes become underscores in TOML).
Vae = Annotated[str | None, typer.Option(help="VAE: a diffusers folder, a cached Hub repo id, a .safetensors/.pth "
                                               "checkpoint (Wan), or random:FAMILY[-tiny], random weights, FAMILY "
                                               f"one of {', '.join(PRESET_STEMS)}. Default: the diffusers VAE "
                                               "matching the latents' channels, from the local Hub cache.")]
Dtype = Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU).")]
Device = Annotated[str | None, typer.Option(help="cuda, cuda:N or cpu (default: cuda if present).")]
Chunk = Annotated[int | None, typer.Option(help="Latent frames per decoder call after the first (default: what fits in "
                                                 "memory on GPUs, 1 on the CPU).")]
Buffers = Annotated[int, typer.Option(help="Buffer slots per lane (2 = double buffering).")]
Sync = Annotated[bool, typer.Option("--sync/--no-sync", help="No overlap: decode, copy, encode one after another.")]
Fps = Annotated[float | None, typer.Option(help="Frame rate (default: from the latents file, else 16).")]
Codec = Annotated[str | None, typer.Option(help=f"{', '.join(CODECS)} (default: from the extension; h264).")]
Crf = Annotated[int, typer.Option(help="Constant-quality level (lower is better).")]
Preset = Annotated[str, typer.Option(help="Encoder speed preset, in x264's names.")]
PixFmt = Annotated[str | None, typer.Option("--pix-fmt", help="yuv420p, yuv420p10le, yuv444p, yuv422p10le, "
                                                               "yuv444p10le or rgb24 (default: the codec's first).")]
Encoders = Annotated[str | None, typer.Option(help="Concurrent encoders for one output: N or auto (segments of a "
                                                  "clip encoded at once, joined losslessly; auto: only for slow "
                                                  "codecs such as h265/av1/vp9, on long clips, with cores to spare).")]
Pad = Annotated[bool, typer.Option("--pad/--no-pad", help="Pad odd sizes by edge replication for 4:2:0/4:2:2.")]
Denorm = Annotated[bool, typer.Option("--denormalize/--no-denormalize",
                                      help="Undo the pipeline's latent normalisation (off for raw latents).")]
Exact = Annotated[bool, typer.Option("--exact/--no-exact",
                                     help="Frames bit-identical to diffusers' vae.decode (GPUs: vaepipe's engine, "
                                          "self-checked against diffusers' ops; CPU: diffusers' own decoder).")]
EngineOpt = Annotated[bool | None, typer.Option("--engine/--no-engine",
                                                help="vaepipe's decode engine (default: on for Wan VAEs on GPUs); "
                                                     "--no-engine decodes with diffusers' own decoder.")]
Fast = Annotated[bool, typer.Option("--fast/--no-fast", hidden=True,
                                    help="Kept for old command lines: the fast engine is the default on GPUs.")]
DecodeTimestep = Annotated[float | None, typer.Option(help="Timestep-conditioned VAEs (LTX 0.9.1+): the pipeline's "
                                                           "decode_timestep (default: the latents file's, else 0).")]
DecodeNoise = Annotated[float | None, typer.Option(help="Their decode_noise_scale (default: the latents file's, else "
                                                        "the decode timestep).")]
Audio = Annotated[Path | None, typer.Option(help="Soundtrack to mux (wav, mp3, m4a, flac, opus…): copied where the "
                                                "container takes its codec, else AAC (MP4/MOV) or Opus (WebM).")]
CutAudio = Annotated[bool, typer.Option("--cut-audio/--no-cut-audio", help="Cut the soundtrack at the video's end; "
                                                                           "--no-cut-audio keeps all of it.")]
Metadata = Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag, repeatable: title, comment, artist… as they "
                                                         "are; other keys join the JSON comment beside the latents "
                                                         "file's prompt, seed, model.")]
NoMetadata = Annotated[bool, typer.Option("--no-metadata", help="Write no tags (not even the latents file's).")]
Bands = Annotated[int | None, typer.Option(help="Decode each frame in N horizontal bands with halos: the same frames "
                                                "as whole, in less GPU memory (Wan VAEs).")]
MaxVram = Annotated[str | None, typer.Option("--max-vram", help="GPU memory the decode may use at its peak (6GiB, "
                                                                 "6000MB): the fewest bands that fit. Default: "
                                                                 "bands only where whole frames do not fit.")]
BandCaches = Annotated[str | None, typer.Option(help="Where the bands' causal caches wait between windows of a "
                                                     "long clip: device or host (default: where they fit).")]
Json = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


@app.command(cls=Command)
def decode(
    latents: Annotated[Path, typer.Argument(help="Latents: .pt, .safetensors, .npy ([C,T,H,W] or [B,C,T,H,W]) or "
                                                 "a ComfyUI .latent.")],
    output: Annotated[str, typer.Argument(help="Video file (.mp4 .mkv .mov .webm) or a PNG pattern "
                                               "(frames/%05d.png). A batch of B writes out_0.mp4 … out_{B-1}.mp4.")],
    vae: Vae = None, dtype: Dtype = None, device: Device = None, chunk: Chunk = None, buffers: Buffers = 2,
    sync: Sync = False, fps: Fps = None, codec: Codec = None, crf: Crf = 18, preset: Preset = "medium",
    pix_fmt: PixFmt = None, pad: Pad = True, encoders: Encoders = "auto", denormalize: Denorm = True,
    exact: Exact = False, engine: EngineOpt = None, fast: Fast = False, decode_timestep: DecodeTimestep = None,
    decode_noise_scale: DecodeNoise = None, audio: Audio = None, cut_audio: CutAudio = True,
    metadata: Metadata = None, no_metadata: NoMetadata = False, bands: Bands = None, max_vram: MaxVram = None,
    band_caches: BandCaches = None, json_out: Json = False, quiet: Quiet = False,
) -> None:
    """Decode one latents file into a video through the three-lane pipeline."""
    reporter = None
    try:
        from .encode import EncodeOptions
        from .mux import parse_metadata
        from .options import DecodeOptions

        # The options first: a bad one is an answer at once, not after the imports (options.py imports no torch).
        options = DecodeOptions(vae=vae, dtype=dtype, device=device, chunk=chunk, buffers=buffers, sync=sync,
                                denormalize=denormalize, exact=exact, engine=engine, fast=fast,
                                decode_timestep=decode_timestep, decode_noise_scale=decode_noise_scale,
                                bands=bands, max_vram=max_vram, band_caches=band_caches)
        encode = EncodeOptions(codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, fps=fps, pad=pad,
                               encoders=encoders, audio=audio, cut_audio=cut_audio,
                               metadata=parse_metadata(metadata) if metadata else None, no_metadata=no_metadata)
        startup.loading(quiet)
        from .progress import Reporter
        from .runner import Session

        imported = startup.process_s()
        reporter = Reporter(quiet=quiet, as_json=json_out)
        startup.init_device_early(options.torch_device())
        if vae and vae.startswith("random:"):  # a preset's checks read its class's signature
            startup.import_diffusers()
        with reporter:
            session = Session(reporter)
            job = session.prepare(latents, output, options, encode)
            outputs = session.run(job)
        reporter.summary({"outputs": outputs, "load_s": round(session.load_s, 3),
                          "startup": startup.parts(imports_done_s=imported, vae_load_s=session.load_s,
                                                   first_call_extra=outputs[0]["first_call_extra_s"])})
    except stops() as e:
        raise fail(e, reporter) from None


@app.command(cls=Command)
def batch(
    config: Annotated[Path, typer.Argument(help="Batch config (TOML): [defaults] and [[jobs]]; see configs/.")],
    shard: Annotated[str | None, typer.Option(help="Take share I of N (0-based: 0/4 … 3/4) without "
                                                   "torch.distributed, for Slurm arrays or shell loops.")] = None,
    gpus: Annotated[int | None, typer.Option(help="Start N workers on this host through torchrun's launcher, "
                                                  "one GPU each (multi-host: torchrun --nnodes … -m vaepipe "
                                                  "batch).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo jobs the manifest says are done.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved jobs (and what would be "
                                                            "skipped) and exit.")] = False,
    manifest: Annotated[Path | None, typer.Option(help="Manifest (JSON Lines) to resume from and write; default: "
                                                       "CONFIG_STEM.manifest.jsonl beside the config.")] = None,
    allow_outside: Annotated[bool, typer.Option("--allow-outside", help="Let the config's jobs write outside its "
                                                                       "folder (absolute or ../ outputs).")] = False,
    vae: Vae = None, dtype: Dtype = None, device: Device = None, chunk: Chunk = None, buffers: Buffers = None,
    sync: Sync = None, fps: Fps = None, codec: Codec = None, crf: Crf = None, preset: Preset = None,
    pix_fmt: PixFmt = None, pad: Pad = None, encoders: Encoders = None, denormalize: Denorm = None,
    exact: Exact = None, engine: EngineOpt = None, fast: Fast = None, decode_timestep: DecodeTimestep = None,
    decode_noise_scale: DecodeNoise = None, audio: Audio = None, cut_audio: CutAudio = None,
    metadata: Metadata = None, no_metadata: NoMetadata = None, bands: Bands = None, max_vram: MaxVram = None,
    band_caches: BandCaches = None, json_out: Json = False, quiet: Quiet = False,
) -> None:
    """Decode many latents files as one batch: GPU kept busy, bad jobs skipped, resumable, sharded by torchrun.

    Decode options given here override the config's jobs and [defaults]. Exit code 1 if any job failed."""
    given = {"vae": vae, "dtype": dtype, "device": device, "chunk": chunk, "buffers": buffers, "sync": sync,
             "fps": fps, "codec": codec, "crf": crf, "preset": preset, "pix_fmt": pix_fmt, "pad": pad,
             "encoders": int(encoders) if encoders and encoders.isdigit() else encoders,
             "denormalize": denormalize, "exact": exact, "engine": engine, "fast": fast,
             "decode_timestep": decode_timestep, "decode_noise_scale": decode_noise_scale,
             "audio": str(audio.resolve()) if audio else None, "cut_audio": cut_audio, "no_metadata": no_metadata,
             "bands": bands, "max_vram": max_vram, "band_caches": band_caches}
    overrides = {k: v for k, v in given.items() if v is not None}
    reporter = None
    try:
        from .config import load_config
        from .mux import parse_metadata

        if metadata:
            overrides["metadata"] = parse_metadata(metadata)
        cfg = load_config(config, overrides, allow_outside=allow_outside)  # (a bad config: an answer before imports)
        startup.loading(quiet)
        from . import batch as runs
        from .progress import Reporter

        reporter = Reporter(quiet=quiet, as_json=json_out)
        options = runs.BatchOptions(shard=runs.parse_shard(shard) if shard else None, overwrite=overwrite,
                                    manifest=manifest)
        if gpus is not None:
            _check_gpus(gpus, shard, device)
        if dry_run:
            world = runs.World.detect(options.shard)
            _print_dry_run(runs.dry_run(cfg, options, world), json_out)
            return
        if gpus is not None:
            args = [str(config.resolve()), *_as_args(overrides), *(["--overwrite"] if overwrite else []),
                    *(["--allow-outside"] if allow_outside else []),
                    *(["--manifest", str(manifest.resolve())] if manifest else []),
                    *(["--json"] if json_out else []), *(["--quiet"] if quiet else [])]
            code = runs.launch(gpus, args)
            if code:
                raise typer.Exit(code)
            return

        def show(summary: dict) -> None:
            reporter.summary(summary)
            if not quiet:
                _print_batch(summary, reporter)

        summary = runs.run(cfg, options, reporter, show)
    except stops() as e:
        raise fail(e, reporter) from None
    if summary["jobs"]["failed"]:
        raise typer.Exit(1)


def _check_gpus(gpus: int, shard: str | None, device: str | None) -> None:
    import torch

    if shard:
        raise BadInput("--gpus and --shard do not mix: --gpus splits this host's share among its GPUs; use one")
    if gpus < 1:
        raise BadInput(f"--gpus must be at least 1, got {gpus}")
    if device == "cpu":
        return  # CPU workers: for tests and demos
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have:
        raise BadInput(f"--gpus {gpus} asked for, but PyTorch sees {have} CUDA GPUs here: use --gpus {have or 1}"
                       + (" with --device cpu to run CPU workers" if not have else ""))


def _as_args(overrides: dict) -> list[str]:
    """Command-line options that give `overrides` again (for the workers --gpus starts)."""
    args = []
    for key, value in overrides.items():
        flag = key.replace("_", "-")
        if key == "metadata":
            for k, v in value.items():
                args += ["--metadata", f"{k}={v}"]
        elif key == "no_metadata":
            args += ["--no-metadata"] if value else []
        elif isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def _print_dry_run(plan: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(plan, indent=2))
        return
    share = "" if plan["mode"] == "single" else f" (this process: rank {plan['rank']} of {plan['world_size']})"
    typer.echo(f"{plan['config']}: {plan['total_jobs']} jobs{share}, manifest {plan['manifest']}")
    for job in plan["jobs"]:
        opts = " ".join(f"{k}={v}" for k, v in job["options"].items())
        typer.echo(f"  [{job['index']:>3}] {job['action']:<11} {job['job']}: {job['latents']} -> {job['output']}"
                   f"  {opts}")
    runs = sum(j["action"] == "run" for j in plan["jobs"])
    typer.echo(f"{runs} to run, {len(plan['jobs']) - runs} to skip")


def _print_batch(summary: dict, reporter: Reporter) -> None:
    jobs = summary["jobs"]
    ratio = summary["decode_busy_ratio"]
    console = reporter.progress.console
    if summary.get("nothing_to_do"):
        console.print(f"nothing to do: {'all ' if jobs['total'] > 1 else ''}{jobs['total']} job"
                      f"{'s are' if jobs['total'] != 1 else ' is'} done (manifest and SHA-256 agree; --overwrite"
                      " redoes them)" if jobs["total"] else "nothing to do: no jobs in this share", highlight=False)
        console.print(f"manifest: {summary['manifest']}", highlight=False)
        return
    console.print(f"{jobs['done']} done, {jobs['failed']} failed, {jobs['skipped']} skipped of {jobs['total']} jobs;"
                  f" {summary['frames']} frames in {summary['wall_after_load_s']:.2f} s after {summary['load_s']:.2f}"
                  f" s of model load; decode lane busy {'–' if ratio is None else f'{ratio:.1%}'} of that",
                  highlight=False)
    first, steady = summary.get("first_job"), summary.get("after_first_job")
    if first and steady and steady["decode_busy_ratio"] is not None:
        console.print(f"after the first job ({first['wall_s']:.2f} s with the start-up: imports, first calls,"
                      f" buffers): decode lane busy {steady['decode_busy_ratio']:.1%} of {steady['wall_s']:.2f} s",
                      highlight=False)
    console.print(f"manifest: {summary['manifest']}", highlight=False)


@app.command("make-latents", cls=Command)
def make_latents(
    output: Annotated[Path, typer.Argument(help="Where to write the latents (.pt, .safetensors, .npy, or .latent "
                                                "as ComfyUI's SaveLatent writes them, for Wan).")],
    size: Annotated[str, typer.Option(help="Video size the latents decode to: HEIGHTxWIDTHxFRAMES.")] = "480x832x81",
    vae: Annotated[str | None, typer.Option(help="The preset whose latents to make (its channels and compression): "
                                                 "random:<family>[-tiny], as for decode. Default: Wan 2.1's, or "
                                                 "Wan 2.2's with --channels 48.")] = None,
    channels: Annotated[int | None, typer.Option(help="Latent channels without --vae: 16 (Wan 2.1) or 48 (Wan "
                                                      "2.2).")] = None,
    batch: Annotated[int, typer.Option(help="Samples in the file.")] = 1,
    fps: Annotated[float, typer.Option(help="Frame rate stored with the latents.")] = 16.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write synthetic N(0, 1) latents (as a pipeline with output_type="latent" leaves them) for demos and benches."""
    from .latents import write_synthetic

    try:
        shape = write_synthetic(output, size=size, channels=channels, vae=vae, batch=batch, fps=fps, seed=seed)
    except stops() as e:
        raise fail(e) from None
    stored = "" if output.suffix.lower() == ".latent" else f" at {fps:g} fps"  # ComfyUI's files hold no fps
    typer.echo(f"wrote {output}: latents {list(shape)}{stored}", err=True)


@app.command(cls=Command)
def info(json_out: Json = False) -> None:
    """Versions, GPUs, the ffmpeg in use and which encoders really work here (each probed with a real encode)."""
    import torch

    from .encode import ffmpeg_exe, probe_encoder

    facts: dict = {"vaepipe": __version__, "python": platform.python_version(), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "gpus": [], "diffusers": _installed("diffusers")}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        facts["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    if not facts["gpus"]:
        facts["gpu_note"] = ("none: this PyTorch is a CPU-only build; vaepipe runs on the CPU (install a CUDA build"
                             " of torch to use an NVIDIA GPU)" if torch.version.cuda is None else
                             f"none: PyTorch (CUDA {torch.version.cuda}) sees no CUDA GPU; vaepipe runs on the CPU"
                             " (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    try:
        facts["ffmpeg"] = ffmpeg_exe()
    except VaepipeError as e:
        raise fail(e) from None
    facts["encoders"] = {name: dict(zip(("works", "detail"), probe_encoder(spec.encoder), strict=True))
                         | {"encoder": spec.encoder} for name, spec in CODECS.items()}
    from .families import FAMILIES

    # Which VAEs decode in bands (--bands, --max-vram): the others decode whole frames, and say why.
    facts["bands"] = {family.label: family.cannot_band or "yes" for family in FAMILIES}
    if json_out:
        typer.echo(json.dumps(facts, indent=2))
        return
    for key in ("vaepipe", "python", "torch", "cuda", "diffusers", "ffmpeg"):
        typer.echo(f"{key:>10}: {facts[key]}")
    for gpu in facts["gpus"]:
        typer.echo(f"{'gpu':>10}: {gpu['index']} {gpu['name']} {gpu['memory_gib']} GiB")
    if not facts["gpus"]:
        typer.echo(f"{'gpu':>10}: {facts['gpu_note']}")
    for name, e in facts["encoders"].items():
        state = "works" if e["works"] else f"fails ({e['detail']})"
        typer.echo(f"{name:>10}: {e['encoder']}: {state}")
    for label, state in facts["bands"].items():
        typer.echo(f"{'bands':>10}: {label}: {state if state == 'yes' else 'no, ' + state}")


@app.command(cls=Command)
def bench(
    vae: Annotated[str | None, typer.Option(help="VAE to time (as for decode). Default: random:wan2.1; "
                                                 "without a GPU random:wan2.1-tiny.")] = None,
    shape: Annotated[str | None, typer.Option(help="Comma-separated HEIGHTxWIDTHxFRAMES sizes; synthetic latents. "
                                                   "Default: 480x832x81,720x1280x81; without a GPU a small size "
                                                   "(48x80x17 for Wan).")] = None,
    dtype: Dtype = None, device: Device = None,
    runs: Annotated[int | None, typer.Option(help="Timed runs per mode and shape, after one warm-up (default: 5; "
                                                  "3 at the small CPU settings).")] = None,
    modes: Annotated[str | None, typer.Option(help="Comma-separated: naive (diffusers as users call it), fastvae "
                                                   "(that path with fastvae's decoder), sync, pipelined (the "
                                                   "default decode), exact (--exact); decode or encode time one "
                                                   "lane alone. Default: naive,sync,pipelined,exact, and fastvae "
                                                   "where it is installed and a GPU is used.")] = None,
    content: Annotated[str, typer.Option(help="What the encoders are given: natural (a pan over photographs, as a "
                                              "trained VAE's clip), noise (what random weights decode to) or "
                                              "both.")] = "natural",
    chunk: Chunk = None, buffers: Buffers = 2,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md, videos, traces and plots.")]
    = Path("bench"),
    trace: Annotated[bool, typer.Option("--trace", help="Write a Chrome/Perfetto trace per shape and mode.")]
    = False,
    plot: Annotated[bool, typer.Option("--plot", help="Write a PNG timeline per shape (needs matplotlib).")]
    = False,
    profile: Annotated[bool, typer.Option("--profile/--no-profile", help="One extra profiled run per mode for "
                                                                         "GPU kernel utilization (CUDA).")] = True,
    crf: Crf = 18, preset: Preset = "medium",
    codec: Annotated[str, typer.Option(help=f"{', '.join(c for c in CODECS if c != 'png')} for every mode but "
                                            "naive.")] = "h264",
    decoders: Annotated[bool, typer.Option("--decoders/--no-decoders", help="Also time the decode lane alone, "
                                                                           "decoder against decoder (diffusers, "
                                                                           "engine, engine-exact, fastvae).")] = True,
    fidelity: Annotated[bool, typer.Option("--fidelity", help="In that table, PSNR and max abs difference against "
                                                             "an fp32 decode with fp32 weights.")] = False,
    encoders: Annotated[str, typer.Option(help="Comma-separated --encoders values to compare, such as 1,auto; "
                                               "each its own table.")] = "auto",
    bands: Annotated[str | None, typer.Option(help="Comma-separated band counts, such as 1,2,4,8: instead of the "
                                                   "other tables, the decode lane in bands against whole frames and "
                                                   "diffusers' enable_tiling: time, peak, frames (Wan).")] = None,
    json_out: Json = False,
    one_shot: Annotated[int | None, typer.Option(help="Fresh-process runs of the whole `vaepipe decode` command "
                                                      "per shape, start-up included (default: 3 on GPUs, none "
                                                      "on the CPU).")] = None,
    quiet: Quiet = False,
) -> None:
    """Time naive diffusers, fastvae, sync, pipelined and exact decoding to video on the same latents, in one
    process, and each decoder's decode lane alone."""
    reporter = None
    try:
        startup.loading(quiet)
        from .bench import BenchOptions, bench_defaults, default_modes, print_table, run_bench
        from .progress import Reporter

        reporter = Reporter(quiet=quiet, as_json=json_out)
        vae, shapes, runs, note = bench_defaults(device, vae, shape, runs)
        if note:
            reporter.log(note)
        if bands:
            from .bench.bands import run_band_bench
            from .options import DecodeOptions

            counts = [int(c) for c in bands.split(",") if c.strip().isdigit()]
            tables = run_band_bench(vae, list(shapes), counts, runs, DecodeOptions(dtype=dtype, device=device), out,
                                    reporter, truth=fidelity)
            reporter.log(f"wrote {out / 'bands.json'} and {out / 'bands.md'}")
            if json_out:
                typer.echo(json.dumps(tables, indent=2))
            return
        options = BenchOptions(vae=vae, shapes=shapes, dtype=dtype, device=device, runs=runs,
                               modes=tuple(m.strip() for m in modes.split(",") if m.strip()) if modes is not None
                               else default_modes(device), chunk=chunk,
                               buffers=buffers, out=out, trace=trace, plot=plot, profile=profile, crf=crf,
                               preset=preset, codec=codec, decoders=decoders, fidelity=fidelity,
                               content=("natural", "noise") if content == "both" else (content,),
                               encoders=tuple(e.strip() for e in encoders.split(",") if e.strip()),
                               one_shot=one_shot)
        report = run_bench(options, reporter)
    except stops() as e:
        raise fail(e, reporter) from None
    print_table(report, reporter)
    reporter.log(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    if json_out:
        typer.echo(json.dumps(report, indent=2))


@app.command(cls=Command)
def warmup(
    vae: Annotated[list[str] | None, typer.Option(help="VAE to warm up, repeatable, as for decode (default: "
                                                       "random:wan2.1 and random:wan2.2, the released Wan VAEs' "
                                                       "architectures: their kernels serve trained weights too).")]
    = None,
    size: Annotated[str, typer.Option(help="Comma-separated video sizes HEIGHTxWIDTH to warm up.")]
    = "480x832,720x1280",
    dtype: Dtype = None, device: Device = None,
    exact: Annotated[bool, typer.Option("--exact/--no-exact", help="Warm up decode --exact's policy instead of the "
                                                                   "default one.")] = False,
    json_out: Json = False, quiet: Quiet = False,
) -> None:
    """Pay the decode engine's first-call set-up ahead of time: compile its Triton kernels (kept in Triton's cache)
    and record per VAE and frame size whether cuDNN's tuning pays for a clip (kept in ~/.cache/vaepipe).

    Each size runs a short clip in two fresh processes. `make install` runs it on GPU machines."""
    reporter = None
    try:
        startup.loading(quiet)
        import torch

        from .engine import tuning
        from .progress import Reporter

        reporter = Reporter(quiet=quiet, as_json=json_out)
        if device is None and not torch.cuda.is_available():
            reporter.log("no CUDA GPU here: nothing to warm up (the engine runs on GPUs)")
            reporter.summary({"warmed": []})
            return
        sizes = [s.strip() for s in size.split(",") if s.strip()]
        warmed = []
        for src in vae or ["random:wan2.1", "random:wan2.2"]:
            for text in sizes:
                reporter.log(f"warming up {src} at {text}…")
                record = tuning.warm_up(src, text, dtype=dtype, device=device, exact=exact)
                clip = record["standard_clip_s"]
                reporter.log(f"  81 frames: {clip['tuned']:.3f} s with cuDNN tuning, {clip['heuristic']:.3f} s with"
                             f" its heuristic: {'tuning' if record['cudnn_tuning'] else 'no tuning'} from now on")
                warmed.append({"vae": src, "size": text, **record})
        reporter.summary({"warmed": warmed, "cache": str(tuning.cache_dir())})
    except stops() as e:
        raise fail(e, reporter) from None


def _installed(package: str) -> str | None:
    """A package's version without importing it (importing diffusers takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    signal.signal(signal.SIGTERM, terminate)
    try:
        app()
    except SystemExit as e:
        if e.code == 130:  # a command stopped by Ctrl-C, its clean-up done
            exit_interrupted(told=_told_interrupted)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C while typer itself was stopping
        exit_interrupted(told=_told_interrupted)
