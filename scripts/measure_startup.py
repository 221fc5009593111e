"""Measure what one `vaepipe decode` costs from a fresh process, in parts (issue 27), and write start-up.json and
start-up.md under --out.

    PYTHONPATH=$PWD python3 scripts/measure_startup.py --out startup-h100                      # a GPU machine
    PYTHONPATH=$PWD python3 scripts/measure_startup.py --out /tmp/s --vae random:wan2.1-tiny \\
        --size 48x80x17 --device cpu --runs 2                                                  # a CPU try-out

What it does, in order (every decode in a process of its own unless said otherwise):
1. `vaepipe --help` and a bad-argument error, --runs fresh processes each;
2. a VAE folder in diffusers' format saved from --vae (Wan 2.1's architecture with random weights: 508 MB fp32),
   and latents of --size (`vaepipe make-latents`);
3. `vaepipe decode LATENTS OUT --vae FOLDER --dtype bf16`, default x264 preset and --preset veryfast, --runs fresh
   processes each (median), with each run's start-up parts;
4. in one process: the imports (torch, diffusers' VAE class), CUDA's start, the random preset's build, the folder's
   load (twice), then two decodes in one session: the first against the second; that again with cuDNN's tuning
   forced on and off (VAEPIPE_CUDNN_TUNING);
5. `vaepipe warmup --vae FOLDER` at the size, then 4 and the one-shot decodes of 3 again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for start-up.json, start-up.md and files")
    parser.add_argument("--vae", default="random:wan2.1", help="preset whose weights fill the VAE folder")
    parser.add_argument("--size", default="480x832x81", help="HEIGHTxWIDTHxFRAMES of the decoded clip")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per one-shot measure")
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(in_one_process(**json.loads(args.child))))
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or child_value("import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(), "vae_preset": args.vae,
              "size": args.size, "device": device, "dtype": dtype, "runs": args.runs}
    log(f"environment: {result['environment']}")

    result["help_s"] = fresh_wall(["--help"], args.runs)
    result["bad_argument_s"] = fresh_wall(["decode", "--crf", "x", "l.pt", "o.mp4"], args.runs, expect=2)
    log(f"--help {result['help_s']['median']:.3f} s, bad argument {result['bad_argument_s']['median']:.3f} s")

    folder, latents = out / "vae", out / "latents.pt"
    if not (folder / "config.json").is_file():
        child_value(f"import torch; from vaepipe.vae import load_vae; load_vae({args.vae!r}, dtype=torch.float32,"
                    f" device=torch.device('cpu')).model.save_pretrained({str(folder)!r}); print('ok')")
    vaepipe(["make-latents", str(latents), "--size", args.size], expect=0)
    result["folder_mb"] = round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)

    from vaepipe.bench.oneshot import time_one_shot

    def one_shots(tag: str) -> dict:
        rows = {}
        for preset in ("medium", "veryfast"):
            rows[preset] = time_one_shot([str(latents), str(out / f"one-shot-{preset}.mp4"), "--vae", str(folder),
                                          "--dtype", dtype, "--device", device, "--preset", preset], args.runs)
            log(f"one-shot {tag}, --preset {preset}: {rows[preset]['wall_s']['median']:.3f} s median"
                f" {rows[preset]['wall_s']['each']}; parts {rows[preset]['startup']}")
        return rows

    probe = {"vae": args.vae, "folder": str(folder), "latents": str(latents), "device": device, "dtype": dtype,
             "out": str(out)}
    result["one_shot"] = one_shots("before warmup")
    result["in_one_process"] = {"default": in_child(probe, None), "cudnn_tuning_on": in_child(probe, "1"),
                                "cudnn_tuning_off": in_child(probe, "0")}
    for tag, r in result["in_one_process"].items():
        log(f"in one process ({tag}): {r}")

    t = time.perf_counter()
    size = "x".join(args.size.split("x")[:2])
    result["warmup"] = json.loads(vaepipe(["warmup", "--vae", str(folder), "--size", size, "--device", device,
                                           "--dtype", dtype, "--json"], expect=0))
    result["warmup"]["wall_s"] = round(time.perf_counter() - t, 3)
    log(f"warmup {result['warmup']['wall_s']:.1f} s: {result['warmup']['warmed']}")
    result["after_warmup"] = {"in_one_process": in_child(probe, None), "one_shot": one_shots("after warmup")}
    log(f"after warmup, in one process: {result['after_warmup']['in_one_process']}")

    (out / "start-up.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "start-up.md").write_text(markdown(result))
    log(f"wrote {out / 'start-up.json'} and {out / 'start-up.md'}")


def in_one_process(*, vae: str, folder: str, latents: str, device: str, dtype: str, out: str) -> dict:
    """Step 4, in the child: each part timed on its own (after a sync where the GPU works)."""
    times = {}
    t = time.perf_counter()
    import torch

    times["import_torch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from vaepipe import startup
    from vaepipe.encode import EncodeOptions
    from vaepipe.runner import DecodeOptions, Session
    from vaepipe.vae import DTYPES, load_vae

    times["import_vaepipe_s"] = time.perf_counter() - t
    t = time.perf_counter()
    startup.import_diffusers()
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan  # noqa: F401

    times["import_diffusers_s"] = time.perf_counter() - t
    where = torch.device(device)

    def sync() -> None:
        if where.type == "cuda":
            torch.cuda.synchronize(where)

    t = time.perf_counter()
    torch.zeros(1, device=where)
    sync()
    times["device_start_s"] = time.perf_counter() - t
    for name, src in (("random_preset_s", vae), ("folder_load_s", folder), ("folder_load_again_s", folder)):
        t = time.perf_counter()
        loaded = load_vae(src, dtype=DTYPES[dtype], device=where)
        sync()
        times[name] = time.perf_counter() - t
        del loaded
    session = Session()
    options = DecodeOptions(vae=folder, dtype=dtype, device=device)
    for i in (1, 2):
        job = session.prepare(latents, f"{out}/in-process-{i}.mp4", options, EncodeOptions())
        (summary,) = session.run(job)
        times[f"decode_{i}_busy_s"] = summary["busy_s"]["decode"]
        times[f"decode_{i}_wall_s"] = summary["wall_s"]
        times[f"decode_{i}_first_call_extra_s"] = summary["first_call_extra_s"]
    times["first_over_second"] = times["decode_1_busy_s"] / times["decode_2_busy_s"]
    times["engine"] = summary["decoder"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in times.items()}


def in_child(probe: dict, tuning: str | None) -> dict:
    env = dict(os.environ)
    env.pop("VAEPIPE_CUDNN_TUNING", None)
    if tuning is not None:
        env["VAEPIPE_CUDNN_TUNING"] = tuning
    proc = run([sys.executable, __file__, "--out", probe["out"], "--child", json.dumps(probe)], env=env)
    if proc.returncode:
        sys.exit(f"in-process measure failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fresh_wall(args: list[str], runs: int, expect: int = 0) -> dict:
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        vaepipe(args, expect=expect)
        walls.append(time.perf_counter() - t)
    return {"median": round(statistics.median(walls), 3), "each": [round(w, 3) for w in walls],
            "command": "vaepipe " + " ".join(args)}


def vaepipe(args: list[str], *, expect: int) -> str:
    proc = run([sys.executable, "-m", "vaepipe", *args])
    if proc.returncode != expect:
        sys.exit(f"vaepipe {' '.join(args)}: exit {proc.returncode}, expected {expect}:\n{proc.stderr}")
    return proc.stdout


def child_value(code: str) -> str:
    proc = run([sys.executable, "-c", code])
    if proc.returncode:
        sys.exit(f"{code}:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("COLUMNS", "80")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


def environment() -> dict:
    code = ("import json, platform, torch, importlib.metadata as m; print(json.dumps({'gpu':"
            " torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'torch': torch.__version__,"
            " 'cuda': torch.version.cuda,"
            " 'diffusers': m.version('diffusers'), 'python': platform.python_version(), 'cores': __import__('os')"
            ".cpu_count()}))")
    return json.loads(child_value(code))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"# vaepipe start-up: {env['gpu']}", "",
             f"- {r['date']}; torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, Python"
             f" {env['python']}, {env['cores']} cores", f"- VAE folder saved from {r['vae_preset']}"
             f" ({r['folder_mb']} MB), latents for {r['size']}, {r['dtype']} on {r['device']}; medians of"
             f" {r['runs']} fresh processes", "",
             "| measure | s |", "|---|---|",
             f"| `{r['help_s']['command']}` | {r['help_s']['median']:.3f} |",
             f"| `{r['bad_argument_s']['command']}` | {r['bad_argument_s']['median']:.3f} |"]
    for tag, shots in (("before warmup", r["one_shot"]), ("after warmup", r["after_warmup"]["one_shot"])):
        for preset, s in shots.items():
            p = s["startup"]
            lines.append(f"| one-shot {tag}, --preset {preset}: wall (imports {p['imports_s']}, load"
                         f" {p['vae_load_s']}, first-call extra {p['first_call_extra_s']})"
                         f" | {s['wall_s']['median']:.3f} |")
    lines += ["", "In one process:", "", "| measure | " + " | ".join(r["in_one_process"]) + " | after warmup |",
              "|---|" + "---|" * (len(r["in_one_process"]) + 1)]
    runs = [*r["in_one_process"].values(), r["after_warmup"]["in_one_process"]]
    for key in runs[0]:
        if key != "engine":
            lines.append(f"| {key} | " + " | ".join(str(x.get(key)) for x in runs) + " |")
    lines += ["", f"warmup: {r['warmup']['wall_s']} s; " + "; ".join(
        f"{w['size']}: cuDNN tuning {w['cudnn_tuning']} ({w['standard_clip_s']})" for w in r["warmup"]["warmed"]),
        "", "Command: `PYTHONPATH=$PWD python3 scripts/measure_startup.py " + " ".join(sys.argv[1:]) + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
