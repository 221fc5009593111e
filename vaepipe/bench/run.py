"""The benchmark run: load the VAE once, then per shape prepare the jobs, time them and write the report."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import torch

from .. import __version__
from ..encode import CODECS, ffmpeg_exe
from ..families import DecodeSettings, synthetic_latents
from ..pipeline import LANES
from ..progress import Reporter
from ..runner import DEFAULT_FPS, DecodeOptions, Session
from ..vae import DTYPES
from .content import SOURCE, natural_frames
from .decoders import decoder_table
from .measure import time_cases
from .modes import NAIVE_ENCODER, NAIVE_STAGES, prepare_case
from .oneshot import time_one_shot
from .options import BenchOptions, Shape
from .plot import chrome_trace, plot_timeline
from .report import case_result, encoder_comparisons, environment, markdown, memory_check


def run_bench(options: BenchOptions, reporter: Reporter) -> dict:
    """Run the benchmark, write bench.json and bench.md (plus traces and plots when asked) under `options.out`,
    and return the report that bench.json holds."""
    decode_options = DecodeOptions(vae=options.vae, dtype=options.dtype, device=options.device,
                                   chunk=options.chunk, buffers=options.buffers)
    device = decode_options.torch_device()
    dtype = decode_options.torch_dtype(device)
    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
    ffmpeg_exe()  # fail now, not after the warm-up, when there is no ffmpeg
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    # One session per vaepipe mode, so each keeps its own lane buffers across runs (sync uses one slot).
    sessions = {"sync": Session(reporter), "pipelined": Session(reporter)}
    vae = sessions["pipelined"].vae(options.vae, dtype, device)
    naive_vae = vae
    report = {
        "vaepipe": __version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": options.command(dtype_name), "environment": environment(device),
        "settings": {"vae": vae.source, "dtype": dtype_name, "device": str(device), "runs": options.runs,
                     "warmup_runs": 1, "modes": list(options.modes), "chunk": options.chunk,
                     "buffers": options.buffers, "fps": DEFAULT_FPS,
                     "latents": "N(0, 1), seed 0, denormalised",
                     "encoder": f"{CODECS[options.codec].encoder} CRF {options.crf} {options.preset} (BT.709),"
                                f" --encoders {','.join(map(str, options.encoders))}",
                     "content": list(options.content), "natural_content": SOURCE,
                     "noise_content": "what the VAE decodes the N(0, 1) latents to (random weights: noise)",
                     "naive_encoder": NAIVE_ENCODER, "profiled": options.profile and device.type == "cuda"},
        "load_s": round(sessions["pipelined"].load_s, 3), "results": [], "decoders": {},
    }
    reporter.log(f"model load {report['load_s']:.2f} s; timing {', '.join(options.modes)} on {device}"
                 f" ({report['environment']['device']}), {options.runs} timed run(s) after one warm-up")
    # All latents first: a shape that does not fit the VAE fails now, not after minutes of timing.
    latents = {text: synthetic_latents(vae.model, text, seed=0) for text in options.shapes}
    for text in options.shapes:
        shape = Shape.parse(text)
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor: naive runs under no_grad, as pipelines do
            z, kwargs = vae.family.prepare(vae.model, latents[text], denormalize=True, settings=DecodeSettings())
        cases = []
        for content in options.content:
            natural = None
            if content == "natural":  # made once, before any timing
                t = time.perf_counter()
                natural = natural_frames(vae.family.num_frames(vae.model, z.shape[2]),
                                         shape.height + shape.height % 2, shape.width + shape.width % 2)
                reporter.log(f"{shape.label}: natural frames made in {time.perf_counter() - t:.1f} s (not timed)")
            cases += [prepare_case(shape, content, e, z, vae, naive_vae, sessions, decode_options, options, out,
                                   natural, kwargs) for e in options.encoders]
        time_cases(cases, options, device, reporter)
        if options.decoders:
            report["decoders"][shape.label] = decoder_table(vae, latents[text], options.vae, options.runs,
                                                            fidelity=options.fidelity, reporter=reporter)
        for case in cases:
            result = case_result(case, vae, options)
            report["results"].append(result)
            tag = f"{case.shape.label}-{case.content}-e{case.encoders}"
            if options.trace:
                for mode in options.modes:
                    path = out / f"trace-{tag}-{mode}.json"
                    lanes = NAIVE_STAGES if mode == "naive" else LANES
                    title = f"vaepipe bench {mode} {case.label}"
                    path.write_text(json.dumps(chrome_trace(case.samples[mode][-1].spans, lanes, title=title)))
                    result["modes"][mode]["trace"] = path.name
            if options.plot:
                path = out / f"timeline-{tag}.png"
                plot_timeline({m: case.samples[m][-1] for m in options.modes}, path, title=f"{case.label},"
                              f" {dtype_name}, {report['environment']['device']}")
                result["timeline"] = path.name
    report["one_shot"] = _one_shot(options, latents, dtype_name, device, out, reporter)
    report["memory"] = memory_check(report["results"])
    report["encoders"] = encoder_comparisons(report["results"])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    return report


def _one_shot(options: BenchOptions, latents: dict, dtype: str, device: torch.device, out: Path,
              reporter: Reporter) -> list[dict]:
    """The one-shot rows: each shape's latents in a file, decoded by `vaepipe decode` in fresh processes."""
    runs = options.one_shot if options.one_shot is not None else 3 if device.type == "cuda" else 0
    rows = []
    for text in options.shapes if runs else ():
        folder = out / "one-shot"
        folder.mkdir(exist_ok=True)
        path = folder / f"latents-{text}.pt"
        torch.save(latents[text], path)
        args = [str(path), str(folder / f"{text}.mp4"), "--vae", options.vae, "--dtype", dtype, "--device",
                str(device), "--codec", options.codec, "--crf", str(options.crf), "--preset", options.preset]
        reporter.log(f"{text}: one-shot, {runs} fresh `vaepipe decode` processes")
        rows.append({"shape": text, **time_one_shot(args, runs)})
    return rows
