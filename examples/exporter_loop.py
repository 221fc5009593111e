"""Clips in a loop through one Exporter, as a generation script would write them: how busy the decode lane stays
once the first clip is done (issue 8's target: at least 90 % on an H100, random:wan2.1 at 480x832x81).

    .venv/bin/python examples/exporter_loop.py --out bench/loop                       # GPU: 10 clips, 480x832x81
    .venv/bin/python examples/exporter_loop.py --device cpu --vae random:wan2.1-tiny --size 48x80x17 --clips 3

(.venv is what `make install` or `make demo` builds, with vaepipe installed in it.)

Each clip goes in with `wait=False`, so its encoder finishes while the next one decodes. The figure is the decode
lane's busy time over clips 2..N divided by the wall time from the end of clip 1's decode to the last file in place
(the last encoder's drain included). No generation runs between clips: this measures vaepipe alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vaepipe
from vaepipe.latents import synthetic_latents
from vaepipe.vae import DTYPES, load_vae


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="random:wan2.1", help="a vaepipe VAE source (stands in for pipe.vae)")
    parser.add_argument("--size", default="480x832x81", help="HEIGHTxWIDTHxFRAMES of each clip")
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--preset", default="medium", help="x264 preset")
    parser.add_argument("--exact", action="store_true", help="the engine's exact policy (diffusers' bits)")
    parser.add_argument("--out", type=Path, default=Path("bench/loop"))
    args = parser.parse_args(argv)
    if args.clips < 2:
        parser.error("--clips must be at least 2: the figure is taken after the first clip")

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    vae = load_vae(args.vae, dtype=dtype, device=device).model  # what a pipeline would hold as pipe.vae
    channels = vae.config.z_dim
    # Latents as the pipeline leaves them: normalised, float32, already on the GPU.
    latents = [synthetic_latents(args.size, channels=channels, seed=i).to(device) for i in range(args.clips)]
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    with vaepipe.Exporter(vae=vae, exact=args.exact) as exporter:
        first = exporter.export(latents[0], args.out / "clip0.mp4", preset=args.preset, wait=False)
        t1 = time.perf_counter()  # clip 1 decoded; its encoder may still be finishing
        pending = [exporter.export(z, args.out / f"clip{i}.mp4", preset=args.preset, wait=False)
                   for i, z in enumerate(latents[1:], start=1)]
        t_decoded = time.perf_counter()
        clips = [first.result()["outputs"][0]] + [p.result()["outputs"][0] for p in pending]
        t_end = time.perf_counter()
    busy = sum(c["busy_s"]["decode"] for c in clips[1:])
    report = {
        "vae": args.vae, "size": args.size, "clips": args.clips, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "preset": args.preset, "exact": args.exact,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "first_clip_s": round(t1 - t0, 4),
        "after_first_wall_s": round(t_end - t1, 4),
        "after_first_decode_busy_s": round(busy, 4),
        "decode_busy_ratio_after_first": round(busy / (t_end - t1), 4),
        "last_drain_s": round(t_end - t_decoded, 4),
        "per_clip": [{k: c[k] for k in ("output", "frames", "wall_s", "busy_s", "encoder_drain_s", "decoder")}
                     for c in clips],
        "vaepipe": vaepipe.__version__, "torch": torch.__version__,
    }
    (args.out / "loop.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.clips} clips {args.size} through one Exporter: decode lane busy"
          f" {report['decode_busy_ratio_after_first']:.1%} of the {report['after_first_wall_s']:.2f} s after the"
          f" first clip ({busy:.2f} s busy; the last encoder's drain {report['last_drain_s']:.2f} s is in the wall);"
          f" wrote {args.out / 'loop.json'}")
    return report


if __name__ == "__main__":
    main()
