"""Reporting: per-mode results from the samples, the targets, the memory check, the environment, bench.md and the
terminal table."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess

import torch

from ..encode import ffmpeg_exe, output_sha256
from ..progress import Reporter
from ..vae import LoadedVae
from .content import psnr
from .measure import Case
from .modes import NAIVE_ENCODER, vaepipe_encoder
from .options import BenchOptions

TARGETS = {"wall_over_decode": 1.03, "kernel_utilization": 0.98, "memory_growth": 1.05, "wall_minus_decode_s": 0.20,
           "encoders_speedup": 2.0, "encoders_size": 1.05}


def case_result(case: Case, vae: LoadedVae, options: BenchOptions) -> dict:
    frames = vae.family.num_frames(vae.model, case.latent_shape[2])
    modes: dict[str, dict] = {}
    for mode, samples in case.samples.items():
        walls = [s.wall_s for s in samples]
        wall = statistics.median(walls)
        decode = statistics.median(s.stages_s["decode"] for s in samples)
        peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
        reserved = [s.reserved_bytes for s in samples if s.reserved_bytes is not None]
        output = case.outputs[mode]
        wrote = mode != "decode"  # the decode lane alone writes no video
        reference = case.references.get(mode)
        modes[mode] = {
            "content": case.content,
            "wall_s": {"median": round(wall, 4), "min": round(min(walls), 4), "max": round(max(walls), 4),
                       "stdev": round(statistics.stdev(walls), 4) if len(walls) > 1 else 0.0,
                       "runs": [round(w, 4) for w in walls]},
            "warmup_s": round(case.warmup_s[mode], 4),
            "decode_busy_s": round(decode, 4),
            "wall_over_decode": round(wall / decode, 4) if decode else None,
            "stages_s": {k: round(statistics.median(s.stages_s[k] for s in samples), 4) for k in samples[0].stages_s},
            "kernel_utilization": _round(case.utilization.get(mode)),
            "kernel_utilization_while_gpu_work": _round(case.utilization_kernels.get(mode)),
            "profiled_wall_s": _round(case.profiled_wall_s.get(mode)),
            "peak_vram_gib": round(max(peaks) / 2**30, 3) if peaks else None,
            "peak_reserved_gib": round(max(reserved) / 2**30, 3) if reserved else None,
            "fps": round(frames / wall, 2),
            "output": str(output) if wrote else None, "bytes": output.stat().st_size if wrote else None,
            "sha256": output_sha256(output) if wrote else None,
            "psnr_db": psnr(output, torch.cat(reference)) if wrote and reference else None,
            "tail_s": round(statistics.median(s.stages_s["finish"] for s in samples), 4)
            if "finish" in samples[0].stages_s else None,
            "wall_minus_decode_s": round(wall - decode, 4) if decode else None,
            "encoders": 1 if mode == "naive" else samples[-1].encoders,
            "encoder": NAIVE_ENCODER if mode == "naive" else vaepipe_encoder(options, case.encoders),
        }
    for row in modes.values():
        for base in ("naive", "sync"):
            other = modes.get(base)
            row[f"speedup_vs_{base}"] = (round(other["wall_s"]["median"] / row["wall_s"]["median"], 3)
                                         if other else None)
    if "sync" in modes and "pipelined" in modes:
        modes["pipelined"]["same_file_as_sync"] = modes["pipelined"]["sha256"] == modes["sync"]["sha256"]
    return {"shape": case.shape.label, "height": case.shape.height, "width": case.shape.width, "frames": frames,
            "content": case.content, "encoders": case.encoders, "latents": list(case.latent_shape), "modes": modes,
            "targets": targets(modes, gpu=vae.device.type == "cuda")}


def encoder_comparisons(results: list[dict]) -> list[dict]:
    """For each shape, content and mode run with several --encoders values: each against --encoders 1 (the one
    encoder of today), with the issue's bounds (>= 2x faster end to end, file within 5 %)."""
    out = []
    for r in results:
        if r["encoders"] == 1:
            continue
        base = next((b for b in results if b["encoders"] == 1 and (b["shape"], b["content"]) == (r["shape"],
                                                                                                  r["content"])), None)
        for mode, m in (base or {}).get("modes", {}).items() if base else ():
            other = r["modes"].get(mode)
            if mode in ("naive", "decode") or other is None or not m["bytes"]:
                continue
            speedup = round(m["wall_s"]["median"] / other["wall_s"]["median"], 3)
            size = round(other["bytes"] / m["bytes"], 4)
            out.append({"shape": r["shape"], "content": r["content"], "mode": mode, "encoders": r["encoders"],
                        "segments": other["encoders"], "speedup_vs_1": speedup, "size_vs_1": size,
                        "psnr_db": other["psnr_db"], "psnr_db_1": m["psnr_db"],
                        "met": speedup >= TARGETS["encoders_speedup"] and size <= TARGETS["encoders_size"]})
    return out


def targets(modes: dict[str, dict], *, gpu: bool = True) -> dict | None:
    """The issue's targets for `pipelined`: each with its value, the bound and whether it is met (None: n/a). They
    are GPU targets: on a CPU, where the decoder and the encoder share the cores, each is n/a."""
    p = modes.get("pipelined")
    if p is None:
        return None
    ratio, util = p["wall_over_decode"], p["kernel_utilization"]
    checks = {
        "wall_minus_decode_s": {"value": p["wall_minus_decode_s"], "bound": f"<= {TARGETS['wall_minus_decode_s']}",
                                "met": p["wall_minus_decode_s"] is not None
                                and p["wall_minus_decode_s"] <= TARGETS["wall_minus_decode_s"]},
        "wall_over_decode": {"value": ratio, "bound": f"<= {TARGETS['wall_over_decode']}",
                             "met": ratio is not None and ratio <= TARGETS["wall_over_decode"]},
        "kernel_utilization": {"value": util, "bound": f">= {TARGETS['kernel_utilization']}",
                               "met": None if util is None else util >= TARGETS["kernel_utilization"]},
    }
    if "sync" in modes:
        checks["speedup_vs_sync"] = {"value": p["speedup_vs_sync"], "bound": "> 1",
                                     "met": p["speedup_vs_sync"] > 1}
    if "naive" in modes:
        # As fast as the decode alone would allow: naive wall / decode-lane busy.
        need = round(modes["naive"]["wall_s"]["median"] / p["decode_busy_s"], 3)
        checks["speedup_vs_naive"] = {"value": p["speedup_vs_naive"], "bound": f">= {need} (naive wall /"
                                      " pipelined decode-lane busy)", "met": p["speedup_vs_naive"] >= need}
    if not gpu:
        for check in checks.values():
            check["met"] = None
    return checks


def memory_check(results: list[dict]) -> list[dict]:
    """Peak VRAM of `pipelined` for each longer clip against the shortest clip of the same height and width:
    streaming keeps memory flat in the clip length."""
    checks = []
    by_size: dict[tuple[int, int], list[dict]] = {}
    for r in results:
        if "pipelined" in r["modes"] and r["modes"]["pipelined"]["peak_vram_gib"] is not None:
            by_size.setdefault((r["height"], r["width"], r.get("content"), r.get("encoders")), []).append(r)
    for group in by_size.values():
        group.sort(key=lambda r: r["frames"])
        base = group[0]["modes"]["pipelined"]["peak_vram_gib"]
        for r in (r for r in group[1:] if r["frames"] > group[0]["frames"]):
            peak = r["modes"]["pipelined"]["peak_vram_gib"]
            checks.append({"shape": r["shape"], "against": group[0]["shape"], "peak_vram_gib": peak,
                           "base_peak_vram_gib": base, "ratio": round(peak / base, 4),
                           "met": peak / base <= TARGETS["memory_growth"]})
    return checks


def environment(device: torch.device) -> dict:
    import diffusers

    facts = {"device": "CPU", "driver": None, "cuda": torch.version.cuda, "torch": torch.__version__,
             "diffusers": diffusers.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(), "ffmpeg": _ffmpeg_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                  "driver": _nvidia_driver()}
    return facts


def _nvidia_driver() -> str | None:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = run.stdout.strip().splitlines()
    return lines[0].strip() if run.returncode == 0 and lines else None


def _ffmpeg_version() -> str | None:
    try:
        run = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = run.stdout.splitlines()[0] if run.stdout else ""
    return first.removeprefix("ffmpeg version ").split(" ")[0] or None


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def markdown(report: dict) -> str:
    """bench.md: the environment, the exact command, a table per shape and the target checks."""
    env, settings = report["environment"], report["settings"]
    lines = [f"# vaepipe bench: {env['device']}", "",
             f"- date: {report['date']}",
             f"- device: {env['device']}" + (f", driver {env['driver']}" if env["driver"] else "")
             + (f", CUDA {env['cuda']}" if env["cuda"] and env["device"] != "CPU" else ""),
             f"- torch {env['torch']}, diffusers {env['diffusers']}, vaepipe {report['vaepipe']}, Python"
             f" {env['python']}, ffmpeg {env['ffmpeg']}, {env['cpu_cores']} CPU cores",
             f"- VAE {settings['vae']}, {settings['dtype']}; latents {settings['latents']}",
             f"- sync and pipelined encode with {settings['encoder']}; naive with {settings['naive_encoder']}",
             f"- content handed to the encoders: {', '.join(settings['content'])} (natural:"
             f" {settings['natural_content']}; noise: {settings['noise_content']}); the decode and copy lanes run for"
             " real either way",
             "- PSNR: of each video, decoded by ffmpeg to RGB, against the frames its encoder was given; tail: the"
             " encoder finishing after the last frame went in; wall − decode: what the decode lane does not hide",
             f"- {settings['runs']} timed runs per mode after one warm-up, modes interleaved in each run; model load"
             f" {report['load_s']:.2f} s (not timed)",
             "- wall = latents in device memory → video closed on disk; GPU kernel utilization (CUDA only) from one"
             " extra run per mode under the torch profiler; peak VRAM = torch.cuda.max_memory_allocated",
             "- wall ÷ decode: wall time over the decode lane's busy time (naive: over its vae.decode)",
             "", "```", report["command"], "```", ""]
    lines += _one_shot_markdown(report.get("one_shot") or [])
    for r in report["results"]:
        lines += [f"## {r['shape']}, {r['content']} content, --encoders {r['encoders']} ({r['frames']} frames from"
                  f" latents {r['latents']})", "",
                  "| mode | content | wall s, median [min–max] | decode-lane busy s | wall − decode s | wall ÷ decode |"
                  " tail s | GPU kernel util | peak VRAM GiB | fps | × vs naive | × vs sync | encoders | MB |"
                  " PSNR dB | warm-up s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, m in r["modes"].items():
            w = m["wall_s"]
            mb = None if m["bytes"] is None else m["bytes"] / 1e6
            lines.append(f"| {mode} | {m['content']} | {w['median']:.3f} [{w['min']:.3f}–{w['max']:.3f}]"
                         f" | {m['decode_busy_s']:.3f} | {_fmt(m['wall_minus_decode_s'], '.3f')}"
                         f" | {_fmt(m['wall_over_decode'], '.3f')} | {_fmt(m['tail_s'], '.3f')}"
                         f" | {_fmt(m['kernel_utilization'], '.1%')}"
                         f" | {_fmt(m['peak_vram_gib'], '.2f')} | {m['fps']:.1f} | {_fmt(m['speedup_vs_naive'], '.2f')}"
                         f" | {_fmt(m['speedup_vs_sync'], '.2f')} | {m['encoders']} | {_fmt(mb, '.3f')}"
                         f" | {_fmt(m['psnr_db'], '.2f')} | {m['warmup_s']:.2f} |")
        lines.append("")
        stages = "; ".join(f"{mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in m["stages_s"].items())
                           for mode, m in r["modes"].items())
        lines += [f"Per-lane busy seconds (median): {stages}.", ""]
        fed = "; ".join(f"{mode} {_fmt(m.get('kernel_utilization_while_gpu_work'), '.1%')}"
                        for mode, m in r["modes"].items())
        lines += [f"GPU kernel utilization from the first kernel to the last (how well the GPU is fed while it has"
                  f" work, leaving out the encoder's drain after it): {fed}.", ""]
        if "same_file_as_sync" in r["modes"].get("pipelined", {}):
            same = r["modes"]["pipelined"]["same_file_as_sync"]
            lines += [f"sync and pipelined files are {'byte-identical' if same else 'DIFFERENT'}.", ""]
        if r["targets"]:
            lines += ["| target (pipelined) | value | bound | met |", "|---|---|---|---|"]
            for name, t in r["targets"].items():
                met = {True: "yes", False: "**no**", None: "n/a" if env["device"] != "CPU" else "n/a (GPU target)"}[
                    t["met"]]
                lines.append(f"| {name} | {_fmt(t['value'], '.3f')} | {t['bound']} | {met} |")
            lines.append("")
        if r.get("timeline"):
            lines += [f"![timeline {r['shape']}]({r['timeline']})", ""]
    for shape, table in report.get("decoders", {}).items():
        lines += [f"## Decode lane alone, {shape} (no encoder; {table['runs']} timed calls after the first)", "",
                  "| decoder | s, median [min–max] | × diffusers | first call s | peak GiB | identical to diffusers |"
                  " PSNR vs fp32 dB | max abs vs fp32 |", "|---|---|---|---|---|---|---|---|"]
        for name, d in table["rows"].items():
            lines.append(f"| {name} | {d['median_s']:.3f} [{d['min_s']:.3f}–{d['max_s']:.3f}]"
                         f" | {_fmt(d['speedup_vs_diffusers'], '.2f')} | {d['first_call_s']:.2f}"
                         f" | {_fmt(d['peak_gib'], '.2f')} | {'yes' if d['identical_to_diffusers'] else 'no'}"
                         f" | {_fmt(d.get('psnr_vs_fp32_db'), '.2f')} | {_fmt(d.get('max_abs_vs_fp32'), '.4f')} |")
        exact = table["rows"].get("engine-exact")
        if exact:
            lines += ["", f"engine-exact: self-check {exact['self_check_s']:.2f} s of its first call; ops run"
                          f" diffusers' way: {', '.join(exact['fallbacks']) or 'none'}."]
        lines += [f"Left out: {name} ({why})." for name, why in table["skipped"].items()] + [""]
    if report.get("encoders"):
        lines += ["## Segment-parallel encoding against one encoder (--encoders 1)", "",
                  "| shape | content | mode | --encoders | segments | × faster | size ÷ one | PSNR dB (one) |"
                  " ≥ 2× and ≤ 1.05 |", "|---|---|---|---|---|---|---|---|---|"]
        for c in report["encoders"]:
            lines.append(f"| {c['shape']} | {c['content']} | {c['mode']} | {c['encoders']} | {c['segments']}"
                         f" | {c['speedup_vs_1']:.2f} | {c['size_vs_1']:.3f} | {_fmt(c['psnr_db'], '.2f')}"
                         f" ({_fmt(c['psnr_db_1'], '.2f')}) | {'yes' if c['met'] else '**no**'} |")
        lines.append("")
    if report["memory"]:
        lines += ["## Memory (pipelined peak VRAM against the shortest clip of the same size)", "",
                  "| shape | peak GiB | against | peak GiB | ratio | within 5 % |", "|---|---|---|---|---|---|"]
        for c in report["memory"]:
            lines.append(f"| {c['shape']} | {c['peak_vram_gib']:.3f} | {c['against']} | {c['base_peak_vram_gib']:.3f}"
                         f" | {c['ratio']:.3f} | {'yes' if c['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _one_shot_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## One-shot: the whole `vaepipe decode` command from a fresh process", "",
             "Wall from the parent's side, median [min–max] of the runs; the parts are the runs' own --json"
             " \"startup\" (medians): imports from the process's start, VAE load, the first calls' extra decode time.",
             "", "| shape | runs | wall s | imports s | VAE load s | first-call extra s | command |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        w, p = r["wall_s"], r["startup"]
        lines.append(f"| {r['shape']} | {r['runs']} | {w['median']:.3f} [{w['min']:.3f}–{w['max']:.3f}]"
                     f" | {_fmt(p['imports_s'], '.3f')} | {_fmt(p['vae_load_s'], '.3f')}"
                     f" | {_fmt(p['first_call_extra_s'], '.3f')} | `{r['command']}` |")
    return [*lines, ""]


def print_table(report: dict, reporter: Reporter) -> None:
    """The results on the reporter's console: one Rich table per shape, narrow enough for 80 columns."""
    from rich import box
    from rich.table import Table

    if reporter.quiet:
        return
    env, dtype = report["environment"], report["settings"]["dtype"]
    for r in report["results"]:
        table = Table(title=f"{r['shape']}, {r['content']} content, --encoders {r['encoders']}, {dtype},"
                      f" {env['device']} (wall: median ± half range; util: GPU kernels)", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for name in ("mode", "wall s", "±", "dec s", "w/dec", "util", "VRAM", "fps", "×naive", "MB", "PSNR"):
            table.add_column(name, justify="left" if name == "mode" else "right", no_wrap=True)
        for mode, m in r["modes"].items():
            w = m["wall_s"]
            table.add_row(mode, f"{w['median']:.3f}", f"±{(w['max'] - w['min']) / 2:.3f}", f"{m['decode_busy_s']:.3f}",
                          _fmt(m["wall_over_decode"], ".3f"), _fmt(m["kernel_utilization"], ".1%"),
                          _fmt(m["peak_vram_gib"], ".2f"), f"{m['fps']:.1f}", _fmt(m["speedup_vs_naive"], ".2f"),
                          _fmt(None if m["bytes"] is None else m["bytes"] / 1e6, ".2f"), _fmt(m["psnr_db"], ".1f"))
        reporter.console.print(table)
        missed = [f"{k} {_fmt(t['value'], '.3f')} (bound {t['bound']})" for k, t in (r["targets"] or {}).items()
                  if t["met"] is False]
        if missed:
            reporter.log(f"{r['shape']} {r['content']} pipelined misses: {'; '.join(missed)}")
    for r in report.get("one_shot") or []:
        w, p = r["wall_s"], r["startup"]
        reporter.log(f"{r['shape']} one-shot (the whole command, fresh process): {w['median']:.2f} s median of"
                     f" {r['runs']}; imports {_fmt(p['imports_s'], '.2f')} s, VAE load {_fmt(p['vae_load_s'], '.2f')}"
                     f" s, first-call extra {_fmt(p['first_call_extra_s'], '.2f')} s")
    for shape, t in report.get("decoders", {}).items():
        table = Table(title=f"{shape} decode lane alone, {dtype}", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True)
        for name in ("decoder", "s", "×diffusers", "first s", "VRAM", "exact", "PSNR fp32"):
            table.add_column(name, justify="left" if name == "decoder" else "right", no_wrap=True)
        for name, d in t["rows"].items():
            table.add_row(name, f"{d['median_s']:.3f}", _fmt(d["speedup_vs_diffusers"], ".2f"),
                          f"{d['first_call_s']:.2f}", _fmt(d["peak_gib"], ".2f"),
                          "yes" if d["identical_to_diffusers"] else "no", _fmt(d.get("psnr_vs_fp32_db"), ".2f"))
        reporter.console.print(table)
    for c in report["memory"]:
        reporter.log(f"memory: {c['shape']} peak {c['peak_vram_gib']:.3f} GiB = {c['ratio']:.3f} × {c['against']}")
