"""`vaepipe bench` on the CPU: the same code as on an H100, on a tiny VAE and a tiny clip, in a few seconds."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe.bench import MODES as ALL_MODES
from vaepipe.bench import Sample, busy_fraction, kernel_utilization, memory_check, profiled_utilization
from vaepipe.bench.content import natural_frames, psnr
from vaepipe.cli import app

from conftest import read_video

runner = CliRunner()
MODES = tuple(m for m in ALL_MODES if m != "fastvae")  # a peer that runs on CUDA GPUs only
SHAPE = "40x72x9"  # 3 latent frames: chunks of 1, 4 and 4 frames; not multiples of 16 (imageio's macro block)
HAS_PLOT = importlib.util.find_spec("matplotlib") is not None
pytestmark = pytest.mark.skipif(importlib.util.find_spec("imageio") is None, reason="naive mode needs imageio")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--shape", SHAPE, "--runs", "2",
            "--out", str(out), "--trace", "--content", "both", "--modes", ",".join(MODES), "--json",
            *(["--plot"] if HAS_PLOT else [])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert json.loads(result.stdout) == report  # --json: bench.json's report on stdout, tables on stderr
    assert set(report) == {"vaepipe", "date", "command", "environment", "settings", "load_s", "results", "decoders",
                           "memory", "encoders", "one_shot"}
    return out, report, result.stderr


@pytest.mark.slow
def test_bench_reports_every_mode_with_its_measures(bench):
    out, report, output = bench
    assert report["settings"]["dtype"] == "fp32" and report["settings"]["device"] == "cpu"
    assert report["load_s"] > 0
    natural, noise = report["results"]  # natural first
    assert (natural["content"], noise["content"]) == ("natural", "noise")
    result = natural
    assert result["shape"] == SHAPE and result["frames"] == 9 and result["latents"] == [1, 16, 3, 5, 9]
    assert list(result["modes"]) == list(MODES)
    for mode, m in result["modes"].items():
        assert len(m["wall_s"]["runs"]) == 2 and m["wall_s"]["min"] <= m["wall_s"]["median"] <= m["wall_s"]["max"]
        assert m["content"] == "natural"
        if mode == "encode":  # the encoder lane alone: no decode
            assert m["decode_busy_s"] == 0 and m["wall_over_decode"] is None and m["speedup_vs_naive"] > 0
            continue
        assert 0 < m["decode_busy_s"] < m["wall_s"]["max"], mode
        assert m["warmup_s"] > 0 and m["fps"] == pytest.approx(9 / m["wall_s"]["median"], rel=1e-2)
        assert m["kernel_utilization"] is None and m["peak_vram_gib"] is None  # no GPU: n/a, not zero
        assert m["speedup_vs_naive"] > 0 and m["speedup_vs_sync"] > 0
    assert result["modes"]["naive"]["speedup_vs_naive"] == 1.0
    assert set(result["modes"]["pipelined"]["stages_s"]) == {"decode", "copy", "encode", "finish"}
    assert set(result["targets"]) == {"wall_minus_decode_s", "wall_over_decode", "kernel_utilization",
                                      "speedup_vs_sync", "speedup_vs_naive"}
    assert result["targets"]["kernel_utilization"]["met"] is None
    md = (out / "bench.md").read_text()
    assert report["command"] in md and "| pipelined |" in md and "| target (pipelined) |" in md
    assert "pipelined" in output and "bench.json" in output  # the Rich table and where the files went


@pytest.mark.slow
def test_decoders_table_on_the_cpu_shows_what_the_cpu_runs(bench):
    """The CPU's decode lane runs vaepipe's stream of diffusers' decoder calls, never the engine (GPUs only)."""
    out, report, output = bench
    table = report["decoders"][SHAPE]
    rows = table["rows"]
    assert list(rows) == ["diffusers", "stream"]
    assert set(table["skipped"]) == {"engine", "engine-exact", "fastvae", "fastvae-tuned"}
    assert "CUDA GPUs only" in table["skipped"]["engine"]
    assert rows["diffusers"]["identical_to_diffusers"] and rows["stream"]["identical_to_diffusers"]
    for row in rows.values():
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"] and row["first_call_s"] > 0
        assert row["speedup_vs_diffusers"] == pytest.approx(rows["diffusers"]["median_s"] / row["median_s"],
                                                            rel=1e-2)
    md = (out / "bench.md").read_text()
    assert f"## Decode lane alone, {SHAPE}" in md and "| stream |" in md and "Left out: engine" in md
    assert "engine-exact " not in output.split("decode lane alone")[-1]  # not a row of the terminal's table


@pytest.mark.slow
def test_gpu_targets_are_not_applicable_on_a_cpu(bench):
    out, report, output = bench
    assert report["environment"]["device"] == "CPU"
    for result in report["results"]:
        assert result["targets"] and all(t["met"] is None for t in result["targets"].values()), result["targets"]
    assert "misses" not in output and "**no**" not in (out / "bench.md").read_text()


@pytest.mark.slow
def test_sync_and_pipelined_write_the_same_file_and_naive_the_same_frames(bench):
    out, report, _ = bench
    videos = {mode: out / "videos" / f"{SHAPE}-noise-eauto-{mode}.mp4" for mode in MODES}
    assert videos["sync"].read_bytes() == videos["pipelined"].read_bytes()
    assert report["results"][1]["modes"]["pipelined"]["same_file_as_sync"] is True
    # naive goes through export_to_video (CRF 25, BT.601, truncating to uint8): the same frames up to codec loss,
    # in the same order.
    naive, ours = (read_video(videos[m]).astype(np.int16) for m in ("naive", "pipelined"))
    assert naive.shape == ours.shape == (9, 40, 72, 3)  # the same frame size: no resize to multiples of 16
    assert np.abs(naive - ours).mean() < 12
    nearest = [int(np.argmin([np.abs(frame - other).mean() for other in ours])) for frame in naive]
    assert nearest == list(range(9))


@pytest.mark.slow
def test_trace_has_one_track_per_lane_and_a_span_per_chunk(bench):
    out, _, _ = bench
    for mode, lanes in {"pipelined": ("decode", "copy", "encode"), "sync": ("decode", "copy", "encode"),
                        "naive": ("decode", "postprocess", "export")}.items():
        events = json.loads((out / f"trace-{SHAPE}-noise-eauto-{mode}.json").read_text())["traceEvents"]
        tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
        assert sorted(tracks.values()) == sorted(lanes)
        spans = [e for e in events if e["ph"] == "X"]
        assert all(e["tid"] in tracks and e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
        by_lane = {lane: [e for e in spans if tracks[e["tid"]] == lane] for lane in lanes}
        if mode == "naive":
            assert all(len(s) == 1 for s in by_lane.values())
        else:
            assert len(by_lane["decode"]) == len(by_lane["copy"]) == 3  # one per latent frame (--chunk 1)
            assert len(by_lane["encode"]) == 4  # and ffmpeg's finish after the last frame
            assert [e["name"] for e in by_lane["decode"]] == ["decode chunk 0", "decode chunk 1", "decode chunk 2"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PLOT, reason="--plot needs matplotlib")
def test_plot_writes_a_png_timeline(bench):
    out, report, _ = bench
    png = out / report["results"][0]["timeline"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_utilization_is_the_union_of_kernels_over_the_job_window():
    job = {"cat": "user_annotation", "name": "job", "ts": 100.0, "dur": 100.0}
    kernels = [(90, 20), (105, 10), (140, 20), (150, 20), (195, 30)]  # (ts, dur): overlaps and both edges
    events = [job, *({"cat": "kernel", "name": "k", "ts": ts, "dur": d} for ts, d in kernels),
              {"cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 120.0, "dur": 20.0}]  # copies are not kernels
    # covered: 100-115, 140-170, 195-200 -> 50 of 100
    assert kernel_utilization(events, "job") == pytest.approx(0.5)
    assert kernel_utilization(events, "another job") is None
    # from the first kernel inside the window (100, clipped) to the last one's end (200, clipped): the same 50 of 100
    assert kernel_utilization(events, "job", kernels_only=True) == pytest.approx(0.5)
    late = [job, {"cat": "kernel", "name": "k", "ts": 150.0, "dur": 10.0}, {"cat": "kernel", "name": "k", "ts": 170.0,
                                                                            "dur": 10.0}]
    assert kernel_utilization(late, "job", kernels_only=True) == pytest.approx(20 / 30)
    assert busy_fraction([], 0.0, 1.0) == 0.0
    assert busy_fraction([(0.0, 2.0), (1.0, 3.0)], 0.0, 4.0) == pytest.approx(0.75)


def test_profiled_run_finds_its_window_in_a_real_profiler_trace():
    # On the CPU no kernel runs, but the annotation that bounds the job must be found: 0.0, not None.
    def job():
        torch.randn(64, 64) @ torch.randn(64, 64)
        return Sample(wall_s=0.01, stages_s={}, spans=[])

    utilization, while_gpu_work, wall = profiled_utilization(job, torch.device("cpu"))
    assert utilization == 0.0 and while_gpu_work is None and wall == 0.01


def test_memory_check_compares_longer_clips_with_the_shortest_of_the_same_size():
    def result(shape, peak):
        h, w, f = map(int, shape.split("x"))
        return {"shape": shape, "height": h, "width": w, "frames": f, "modes": {"pipelined": {"peak_vram_gib": peak}}}

    checks = memory_check([result("480x832x1281", 4.2), result("480x832x81", 4.0), result("720x1280x81", 9.0)])
    assert checks == [{"shape": "480x832x1281", "against": "480x832x81", "peak_vram_gib": 4.2,
                       "base_peak_vram_gib": 4.0, "ratio": 1.05, "met": True}]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--modes", "naive,fast", "modes must be distinct names among naive, fastvae, sync, pipelined, exact, decode,"
                              " encode"),
    ("--content", "cartoon", "content must be natural, noise or both"),
    ("--codec", "png", "codec must be one of h264"),
    ("--encoders", "0", "encoders must be auto or a number in 1..64, got 0"),
    ("--runs", "0", "runs must be in 1..100"),
    ("--shape", "480x832", "shape must be HEIGHTxWIDTHxFRAMES"),
    ("--shape", "50x80x9", "size 50x80x9 does not fit the VAE"),
])
def test_bad_options_exit_2_with_the_fix(tmp_path, option, value, message):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--shape", "48x80x9",
                                 "--runs", "1", "--out", str(out), option, value])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (out / "bench.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "shape", "frames"), [("random:hunyuanvideo-tiny", "16x24x21", 21),
                                                         ("random:ltx-tiny", "64x96x17", 17)])
def test_bench_times_other_families(tmp_path, preset, shape, frames):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--vae", preset, "--shape", shape, "--runs", "1",
                                 "--modes", "naive,sync,pipelined", "--content", "noise", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (got,) = json.loads((out / "bench.json").read_text())["results"]
    assert got["frames"] == frames and list(got["modes"]) == ["naive", "sync", "pipelined"]
    videos = {mode: out / "videos" / f"{shape}-noise-eauto-{mode}.mp4" for mode in got["modes"]}
    assert videos["sync"].read_bytes() == videos["pipelined"].read_bytes()
    assert len(read_video(videos["naive"])) == len(read_video(videos["pipelined"])) == frames  # naive pads to 16 px


@pytest.mark.slow
def test_natural_content_goes_to_the_encoder_while_the_lanes_decode_for_real(bench):
    out, report, _ = bench
    natural, noise = (r["modes"] for r in report["results"])
    video = read_video(out / "videos" / f"{SHAPE}-natural-eauto-pipelined.mp4").astype(int)
    made = natural_frames(9, 40, 72).numpy().astype(int)
    noisy = read_video(out / "videos" / f"{SHAPE}-noise-eauto-pipelined.mp4").astype(int)
    assert np.abs(video - made).mean() < 8 < 30 < np.abs(noisy - made).mean()  # the photographs' pan, up to 4:2:0
    for mode in ("naive", "sync", "pipelined", "encode"):
        # Each video against the frames its encoder got: natural content encodes smaller and closer.
        assert natural[mode]["psnr_db"] > noise[mode]["psnr_db"] > 10, mode
        assert natural[mode]["bytes"] < noise[mode]["bytes"], mode
    assert natural["pipelined"]["psnr_db"] == natural["sync"]["psnr_db"] == natural["encode"]["psnr_db"]
    assert natural["pipelined"]["decode_busy_s"] > 0 and natural["decode"]["bytes"] is None  # decode alone: no video
    assert natural["pipelined"]["tail_s"] >= 0 and natural["pipelined"]["encoders"] == 1
    md = (out / "bench.md").read_text()
    assert md.index("natural content") < md.index("noise content") and "| PSNR dB |" in md


def test_natural_frames_pan_smoothly_and_are_the_same_every_time():
    a, b = natural_frames(12, 48, 80), natural_frames(12, 48, 80)
    assert torch.equal(a, b) and a.shape == (12, 48, 80, 3) and a.dtype == torch.uint8
    steps = [(a[t + 1].float() - a[t].float()).abs().mean().item() for t in range(11)]
    assert min(steps) > 0 and max(steps) < 40  # it moves, a little each frame
    assert a.float().std() > 30  # photographs, not a flat picture


def test_psnr_of_a_video_against_its_frames(tmp_path):
    from vaepipe.encode import EncodeOptions, Encoder, plan_encode

    frames = natural_frames(5, 48, 80)
    plan = plan_encode(tmp_path / "o.mkv", width=80, height=48, fps=16.0,
                       options=EncodeOptions(codec="ffv1", pix_fmt="rgb24"))
    encoder = Encoder(plan)
    encoder.write(frames)
    encoder.finish()
    assert psnr(tmp_path / "o.mkv", frames) == 100.0  # lossless: identical
    off = frames.clone()
    off[0, 0, 0, 0] = 255 - int(off[0, 0, 0, 0])  # one value changed by d: MSE = d^2 / values
    d = abs(255 - 2 * int(frames[0, 0, 0, 0]))
    assert psnr(tmp_path / "o.mkv", off) == pytest.approx(10 * np.log10(255**2 / (d**2 / off.numel())), abs=1e-3)
    assert psnr(tmp_path / "o.mkv", frames[:4]) is None  # another frame count: no number rather than a wrong one


def test_natural_content_without_scikit_image_is_one_sentence(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    result = runner.invoke(app, ["bench", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--shape", "48x80x9",
                                 "--out", str(tmp_path / "b")])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "pip install scikit-image" in message and "--content noise" in message


def test_bench_modules_import_each_other_one_way_only():
    """No import circle inside vaepipe/bench (options.py once took the mode names from modes.py, which took
    BenchOptions back): every relative import, TYPE_CHECKING ones too, points down a tree."""
    import ast
    from pathlib import Path

    import vaepipe.bench

    folder = Path(vaepipe.bench.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        imports[path.stem] = {alias.name if node.module is None else node.module.split(".")[0]
                              for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                              for alias in node.names}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in imports.get(start, ()))

    circles = sorted(m for m in imports if reaches(m, m, {m}))
    assert not circles, f"bench modules in an import circle: {circles}"


def test_bench_without_a_gpu_times_the_tiny_cpu_settings_not_full_size(tmp_path, monkeypatch):
    import vaepipe.bench

    timed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vaepipe.bench, "run_bench", lambda options, reporter: timed.append(options) or {})
    monkeypatch.setattr(vaepipe.bench, "print_table", lambda report, reporter: None)
    result = runner.invoke(app, ["bench", "--content", "noise", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (options,) = timed
    assert (options.vae, options.shapes, options.runs) == ("random:wan2.1-tiny", ("48x80x17",), 3)
    assert "no GPU: timing small CPU settings" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", "--vae", "random:ltx-tiny", "--runs", "1", "--content", "noise",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (timed[-1].vae, timed[-1].shapes, timed[-1].runs) == ("random:ltx-tiny", ("192x320x33",), 1)
    result = runner.invoke(app, ["bench", "--shape", "48x80x9", "--content", "noise", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (timed[-1].vae, timed[-1].shapes, timed[-1].runs) == ("random:wan2.1", ("48x80x9",), 5)  # as asked


def test_bench_of_a_vae_folder_without_a_gpu_or_shape_is_refused_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["bench", "--vae", str(tmp_path), "--out", str(tmp_path / "bench")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "take hours on the CPU" in message and "--shape" in message
    assert "vaepipe bench --device cpu --vae random:wan2.1-tiny --shape 48x80x17 --runs 3" in message
    assert not (tmp_path / "bench").exists()


def test_bench_defaults_on_a_gpu_are_the_released_sizes():
    from vaepipe.bench import bench_defaults

    assert bench_defaults("cuda", None, None, None) == ("random:wan2.1", ("480x832x81", "720x1280x81"), 5, None)
