"""Fuzz worker for test_fuzz.py: random and mutated latents files (.pt, .safetensors, .npy: headers, shapes,
strides, dtypes, metadata) and batch configs, each run through the CLI in this one process, then random tag values
(bytes, control characters, ffmetadata's syntax) through the four ways tags come in (--metadata, a latents file's
prompt, a batch config, the Python API), read back with ffmpeg; all under an address-space limit of HEADROOM GiB
beyond what the imports took; one JSON line per case on stdout, for test_fuzz.py to judge.

    python tests/fuzz.py SEED CASES FOLDER HEADROOM [TAG_CASES]
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import resource
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan  # noqa: F401 - imported before the limit, as the CLI would import it
from numpy.lib import format as npy
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

import vaepipe
from vaepipe.cli import app

from conftest import ffmpeg_processes_under, read_metadata, tiny_vae, toml_string

HUGE = (10**4, 10**5, 10**6, 2**31, 2**40)
FLOATS = (torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16)
OTHERS = (torch.float64, torch.int64, torch.uint8, torch.bool, torch.complex64)
FPS = [None, 16.0, 24] * 3 + [0, -3.0, float("nan"), float("inf"), 1e9, "abc", "", True, 10**400, [1], {"a": 1}]


class Plain:
    """A non-tensor object in a pickle: refused by torch's restricted unpickler."""


# -- latents ------------------------------------------------------------------------------------------------------
def small_shape(rng: random.Random, channels: int) -> tuple[int, ...]:
    shape = (channels, rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4))
    roll = rng.random()
    if roll < 0.15:
        shape = (rng.randint(1, 2), *shape)  # a batch
    elif roll < 0.2:
        shape = shape[: rng.randint(0, 3)] + (rng.randint(1, 3),) * rng.randint(0, 3)  # another rank
    elif roll < 0.23:
        shape = tuple(rng.choice((0, n)) for n in shape)  # an empty dimension
    return shape


def pick_dtype(rng: random.Random) -> torch.dtype:
    return rng.choice(OTHERS) if rng.random() < 0.12 else rng.choice(FLOATS)


def tensor(rng: random.Random, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    t = torch.randn(shape, generator=g)
    if rng.random() < 0.05 and t.numel():
        t.view(-1)[rng.randrange(t.numel())] = rng.choice((float("nan"), float("inf")))
    return t.to(dtype)


def odd_layout(rng: random.Random, channels: int) -> torch.Tensor:
    """Stride-0, overlapping, transposed or offset views, small or declaring huge sizes."""
    kind = rng.choice(("expand", "expand-huge", "transpose", "overlap", "offset", "overlap-huge"))
    base = torch.randn(channels, 1, 1, 1)
    if kind == "expand":
        return base.expand(channels, rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4))
    if kind == "expand-huge":
        return base.expand(channels, rng.randint(1, 3), rng.choice(HUGE[:3]), rng.choice(HUGE[:3]))
    if kind == "transpose":
        return torch.randn(channels, 3, 4, 2).transpose(2, 3)
    if kind == "offset":
        return torch.randn(channels + 3, 2, 3, 3)[3:]
    if kind == "overlap-huge":  # elements shared along every dimension, within a tiny storage
        return torch.randn(channels * 8).as_strided((channels, 2, rng.choice(HUGE[1:3]), 7), (1, 2, 0, 1))
    return torch.randn(channels * 8).as_strided((channels, 2, rng.randint(1, 4), rng.randint(1, 4)), (1, 2, 1, 1))


def pt_bytes(rng: random.Random, channels: int) -> bytes:
    obj = odd_layout(rng, channels) if rng.random() < 0.2 else tensor(rng, small_shape(rng, channels), pick_dtype(rng))
    shape = rng.random()
    if shape < 0.4:
        obj = {"latents": obj, "fps": rng.choice(FPS)}
    elif shape < 0.43:
        obj = {"latents": obj, "extra": Plain()}
    elif shape < 0.46:
        obj = rng.choice(([obj], {"other": obj}, "text", 3, {"latents": "x"}))
    elif shape < 0.48:
        obj = torch.sparse_coo_tensor(torch.zeros(4, 1, dtype=torch.long), torch.ones(1), (channels, 1, 2, 2))
    buffer = io.BytesIO()
    legacy = rng.random() < 0.03
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    data = buffer.getvalue()
    if not legacy and rng.random() < 0.05:  # the same archive, deflated: small on disk, as large unpacked
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            for entry in zin.infolist():
                zout.writestr(entry.filename, zin.read(entry.filename))
        data = out.getvalue()
    return data


def npy_bytes(rng: random.Random, channels: int) -> bytes:
    if rng.random() < 0.25:  # a header that says anything, over a few bytes of data
        shape = tuple(rng.choice((1, channels, 2, *HUGE)) for _ in range(rng.choice((4, 5, 5, 3))))
        descr = rng.choice(("<f4", "<f4", ">f4", "<f2", "<f8", "|b1", "<i8", "|O", "<U4", "<c8"))
        header = {"descr": descr, "fortran_order": rng.random() < 0.3, "shape": shape}
        buffer = io.BytesIO()
        (npy.write_array_header_1_0 if rng.random() < 0.8 else npy.write_array_header_2_0)(buffer, header)
        return buffer.getvalue() + bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
    shape = small_shape(rng, channels)
    kind = rng.choice((np.float32, np.float32, np.float32, np.float16, ">f4", np.float64, np.int32))
    array = np.asarray(tensor(rng, shape, torch.float32).numpy(), dtype=kind)
    if rng.random() < 0.3 and array.ndim > 1:
        array = np.asfortranarray(array)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def safetensors_bytes(rng: random.Random, channels: int) -> bytes:
    metadata = rng.choice((None, None, {"fps": "16"}, {"fps": "16"}, {"fps": "abc"}, {"fps": "nan"}, {"fps": "1e999"},
                           {"fps": ""}, {"fps": "-4"}, {"other": "x"}))
    if rng.random() < 0.25:  # a hand-written header: shapes, dtypes and offsets that need not agree
        shape = [rng.choice((1, channels, 2, 3, *HUGE)) for _ in range(rng.choice((4, 5, 5, 2)))]
        dtype = rng.choice(("F32", "F32", "F16", "BF16", "F64", "I64", "BOOL", "F8_E4M3", "XYZ"))
        size = rng.randint(0, 4096)
        offsets = rng.choice(([0, size], [0, 2**62], [size, 0], [0, math.prod(shape) * 4]))
        header = {rng.choice(("latents", "latents", "x")): {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header).encode()
        length = rng.choice((len(text), len(text), 2**40, len(text) + 7))
        return struct.pack("<Q", length) + text + bytes(rng.randrange(256) for _ in range(size))
    shape = small_shape(rng, channels)
    tensors = {rng.choice(("latents", "latents", "latents", "z")): tensor(rng, shape, pick_dtype(rng))}
    if rng.random() < 0.15:
        tensors["second"] = torch.zeros(2)
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.choice(("flip", "flip", "truncate", "append", "zero", "insert"))
    if kind == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        del data[rng.randrange(len(data) + 1):]
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    elif kind == "zero" and data:
        start = rng.randrange(len(data))
        data[start : start + rng.randint(1, 64)] = bytes(len(data[start : start + 64]))
    elif kind == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(data)


def latents_file(rng: random.Random, folder: Path, channels: int) -> Path:
    suffix = rng.choice((".pt", ".pt", ".safetensors", ".npy", ".pth"))
    make = {".pt": pt_bytes, ".pth": pt_bytes, ".safetensors": safetensors_bytes, ".npy": npy_bytes}[suffix]
    data = make(rng, channels)
    if rng.random() < 0.15:
        data = mutate(rng, data)
    path = folder / f"lat{suffix}"
    path.write_bytes(data)
    return path


# -- cases --------------------------------------------------------------------------------------------------------
def decode_case(rng: random.Random, folder: Path) -> tuple[list[str], list[Path]]:
    """`vaepipe decode` of a random latents file with random options; the places output may appear."""
    preset = "random:wan2.2-tiny" if rng.random() < 0.1 else "random:wan2.1-tiny"
    channels = 48 if ("2.2" in preset) != (rng.random() < 0.05) else 16
    latents = latents_file(rng, folder, channels)
    name = rng.choice(("o.mp4", "o.mp4", "o.mp4", "o.mkv", "o.webm", "o.mov", "f/%03d.png", "o.MP4", "o.avi", "o"))
    args = ["decode", str(latents), str(folder / "out" / name), "--vae", preset, "--device", "cpu", "-q",
            "--preset", "ultrafast"]
    for option, values in (("--fps", ("10", "23.976", "10", "0", "-1", "nan", "2000")),
                           ("--crf", ("0", "30", "30", "52", "64", "-1")),
                           ("--codec", ("h264", "ffv1", "vp9", "prores", "png", "divx", "h264_nvenc")),
                           ("--pix-fmt", ("yuv444p", "rgb24", "nv12", "yuv420p10le")),
                           ("--chunk", ("1", "2", "2", "0", "65")), ("--buffers", ("2", "3", "3", "1", "9")),
                           ("--dtype", ("fp32", "bf16", "fp32", "fp8"))):
        if rng.random() < 0.07:
            args += [option, rng.choice(values)]
    args += [rng.choice(("--sync", "--no-pad", "--no-denormalize", "--json"))] if rng.random() < 0.2 else []
    return args, [folder / "out"]


OPTIONS = {"crf": (0, 20, 20, 52, 64, -1, "20", 1.5), "codec": ("h264", "h264", "ffv1", "vp9", "prores", "divx"),
           "fps": (10, 10, 23.976, 0, -1, "x", True), "chunk": (1, 2, 2, 0, 70), "buffers": (2, 3, 3, 1, 9),
           "sync": (True, False, "yes"), "dtype": ("fp32", "fp32", "fp4"), "pix_fmt": ("yuv444p", "nv12"),
           "pad": (True, True, 1), "denormalize": (True, False), "colour": ("red",)}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def batch_case(rng: random.Random, folder: Path) -> tuple[list[str], list[Path]]:
    """`vaepipe batch` of a random config over valid latents, with a random manifest beforehand."""
    (folder / "lat").mkdir()
    for i in range(rng.randint(1, 3)):
        torch.save({"latents": torch.randn(16, rng.randint(1, 2), 2, 3), "fps": 12.0}, folder / "lat" / f"c{i}.pt")
    lines = ['[defaults]', 'vae = "random:wan2.1-tiny"', 'device = "cpu"', 'preset = "ultrafast"']
    lines += [f"{k} = {toml_value(rng.choice(v))}" for k, v in OPTIONS.items() if rng.random() < 0.05]
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        lines.append("[[jobs]]")
        if rng.random() < 0.5:
            latents = rng.choice(("lat/c0.pt", "lat/c0.pt", "lat/c0.pt", "lat/none.pt", "lat/c0.bin"))
            output = rng.choice(("out/a.mp4", "out/a.mp4", "out/a.mkv", "out/f/%03d.png", "out/a.avi"))
            lines += [f"latents = {toml_value(latents)}", f"output = {toml_value(output)}"]
        else:
            suffix = rng.choice((None, None, None, ".mkv", ".mp4", "mp4", "./../../x.mp4", "/abs.mp4", "..",
                                 ".%03d.png", "\\x.mp4", ".a/b.mp4", 5))
            inputs = rng.choice(("lat/*.pt", "lat/*.pt", "lat/*.pt", "nothing/*.pt", 5))
            lines += [f"inputs = {toml_value(inputs)}",
                      f"output_dir = {toml_value(rng.choice(('out', 'out', 'out/deeper', '')))}"]
            lines += [f"suffix = {toml_value(suffix)}"] if suffix is not None else []
        lines += [f"{k} = {toml_value(rng.choice(v))}" for k, v in OPTIONS.items() if rng.random() < 0.03]
    if rng.random() < 0.05:
        lines.append(rng.choice(("[extra]", "jobs = 3", "[[jobs]]\nlatents = ")))
    text = "\n".join(lines) + "\n"
    config = folder / "batch.toml"
    config.write_bytes(mutate(rng, text.encode()) if rng.random() < 0.05 else text.encode())
    manifest = folder / "batch.manifest.jsonl"
    args = ["batch", str(config), "--json"]
    roll = rng.random()
    if roll < 0.1:
        manifest.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
    elif roll < 0.2:
        manifest.write_text(json.dumps({"output": str(folder / "out" / "a.mp4"), "status": "done"}) + "\n{\"jo")
    elif roll < 0.25:
        (folder / "m").mkdir()
        args += ["--manifest", str(folder / "m")]
    elif roll < 0.3:
        manifest.write_text("not json\nat all\n")
    for flag in ("--dry-run", "--overwrite"):
        args += [flag] if rng.random() < 0.15 else []
    if rng.random() < 0.1:
        args += ["--shard", rng.choice(("0/1", "1/2", "2/2", "x"))]
    return args, [folder / "out", manifest, folder / "m", *folder.glob("batch.manifest.*")]


# -- tags ---------------------------------------------------------------------------------------------------------
TAG_PIECES = ("\r", "\n", "\r\n", "\\", "=", ";", "#", "[CHAPTER]", "\t", "\x1b[31m", "\x7f", "\x85", "\u2028",
              "\ufeff", "é", "\U0001f98a", " ", "title=evil", "\0")


def tag_value(rng: random.Random) -> str:
    """Random bytes read as the command line reads them (UTF-8, else lone surrogates), control characters and
    pieces of ffmetadata's syntax; sometimes a NUL, often a trailing backslash."""
    parts = []
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        if roll < 0.3:  # as Latin-1 (C1 controls and all), or as UTF-8 where invalid bytes are lone surrogates
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
            parts.append(data.decode("latin-1") if rng.random() < 0.8 else data.decode("utf-8", "surrogateescape"))
        elif roll < 0.5:
            parts.append("".join(chr(rng.choice((*range(1, 32), 127))) for _ in range(rng.randint(1, 4))))
        elif roll < 0.55:
            parts.append("\0")
        else:
            parts.append(rng.choice(TAG_PIECES[:-1]) + "ab")
    text = "".join(parts).replace("\0", "") if rng.random() < 0.7 else "".join(parts)
    return text + ("\\" if rng.random() < 0.4 else "")


def tags_case(rng: random.Random, folder: Path) -> dict:
    """One tag case: a random title and artist through one route into one container; what came back."""
    route = rng.choice(("cli", "latents", "batch", "api"))
    out = folder / f"out.{rng.choice(('mp4', 'mkv', 'mov', 'webm'))}"
    sent = {"title": tag_value(rng), "artist": tag_value(rng)}
    z = torch.randn(16, 2, 2, 3)
    result, refused, crash = None, None, None
    if route == "latents":  # the prompt is the title
        torch.save({"latents": z, "prompt": sent["title"], "artist": sent["artist"]}, folder / "lat.pt")
    else:
        torch.save(z, folder / "lat.pt")
    args = ["decode", str(folder / "lat.pt"), str(out), "--vae", "random:wan2.1-tiny", "--device", "cpu",
            "--preset", "ultrafast"]
    if route == "cli":
        result = CliRunner().invoke(app, [*args, *(a for k, v in sent.items() for a in ("--metadata", f"{k}={v}"))])
    elif route == "latents":
        result = CliRunner().invoke(app, args)
    elif route == "batch":
        table = ", ".join(f"{k} = {toml_string(v)}" for k, v in sent.items())
        (folder / "jobs.toml").write_text(f'[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\n[[jobs]]\n'
                                          f'latents = "lat.pt"\noutput = "{out.name}"\nmetadata = {{ {table} }}\n')
        result = CliRunner().invoke(app, ["batch", str(folder / "jobs.toml"), "--json"])
    else:
        try:
            vaepipe.export_video(z, out, vae=tiny_vae(), metadata=sent, preset="ultrafast")
        except vaepipe.BadInput as e:
            refused = str(e)
        except Exception as e:  # noqa: BLE001 - reported for the test to judge
            crash = e
    if result is not None:
        crash = result.exception if not isinstance(result.exception, SystemExit) else None
    code = result.exit_code if result is not None else (1 if crash else 2 if refused else 0)
    read = read_metadata(out) if code == 0 and out.exists() else None
    return {"route": route, "container": out.suffix, "sent": sent, "code": code,
            "exception": repr(crash) if crash else None,
            "traceback": crash is not None or (result is not None and "Traceback" in result.output),
            "read": {k: read[0].get(k) for k in sent} if read else None,
            "sections": [name for name, _ in read[1] if name != "STREAM"] if read else None,
            "warned": result is not None and "warning:" in result.output,
            "output": (result.output if result is not None else refused or "")[-400:],
            "files": sorted(p.name for p in folder.iterdir() if p.name not in ("lat.pt", "jobs.toml"))}


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


def main(seed: int, cases: int, root: Path) -> None:
    rng = random.Random(seed)
    runner = CliRunner()
    for i in range(cases):
        folder = root / f"case{i:03d}"
        folder.mkdir(parents=True)
        make = batch_case if rng.random() < 0.25 else decode_case
        args, places = make(rng, folder)
        before = snapshot(folder)
        started = time.perf_counter()
        result = runner.invoke(app, args)
        seconds = time.perf_counter() - started
        after = snapshot(folder)
        new = sorted(set(after) - set(before))
        # Batch outputs and manifests, and decode outputs, may appear (on success); nothing else, ever.
        allowed = [str(p.relative_to(folder)) for p in places]
        crash = result.exception if not isinstance(result.exception, SystemExit) else None
        print(json.dumps({
            "case": i, "kind": make.__name__, "seconds": round(seconds, 2),
            "args": [a.replace(str(root), "") for a in args],
            "code": result.exit_code, "exception": repr(crash) if crash else None,
            "traceback": "Traceback" in result.output or crash is not None, "new": new,
            "stray": [p for p in new if not any(p == a or p.startswith(a + "/") for a in allowed)
                      or ".part" in p or ".vaepipe-" in p],
            "changed": sorted(p for p in before if after.get(p) != before[p]),
            "ffmpeg": ffmpeg_processes_under(folder), "output": result.output[-400:],
        }), flush=True)


def limit_address_space(headroom: int) -> int:
    """The memory ceiling: what the cases allocate must fit in `headroom` bytes of address space beyond what the
    imports took (which depends on the torch build: a CUDA one maps gigabytes of GPU libraries). Returns it."""
    size = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
    return size + headroom


def main_tags(seed: int, cases: int, root: Path) -> None:
    rng = random.Random(f"tags{seed}")
    for i in range(cases):
        folder = root / f"tags{i:03d}"
        folder.mkdir(parents=True)
        print(json.dumps({"case": i, "kind": "tags_case", **tags_case(rng, folder),
                          "ffmpeg": ffmpeg_processes_under(folder)}), flush=True)


if __name__ == "__main__":
    limit = limit_address_space(int(float(sys.argv[4]) * 2**30))
    print(f"address-space limit {limit / 2**30:.2f} GiB", file=sys.stderr)
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
    main_tags(int(sys.argv[1]), int(sys.argv[5]) if len(sys.argv) > 5 else 0, Path(sys.argv[3]))
    peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmPeak"))
    print(peak, file=sys.stderr)
