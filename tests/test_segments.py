"""Segment-parallel encoding: where the cuts go, the joined file against one encoder's, and every failure path."""

import os
import random
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe import segments
from vaepipe.cli import app
from vaepipe.encode import EncodeOptions, Encoder, output_sha256, plan_encode
from vaepipe.errors import BadInput, VaepipeError
from vaepipe.segments import SegmentedEncoder, segment_lengths, split, timestamp_step

from conftest import ffmpeg_processes_under, frame_times, read_video, start_vaepipe, write_latents

H, W = 32, 48


def frames(n: int, seed: int = 0) -> torch.Tensor:
    """A small moving picture (smooth, so inter frames are cheap, as in real clips) with a little noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    t = torch.arange(n).view(n, 1, 1)
    base = torch.stack([(x + 2 * t) * 5, (y + t) * 7, (x + y - t) * 3], dim=-1) % 256
    return (base + torch.randint(0, 8, (n, H, W, 3), generator=g)).clamp(0, 255).to(torch.uint8).contiguous()


def plan(dest: Path, codec: str | None = None, **options):
    return plan_encode(dest, width=W, height=H, fps=16.0, options=EncodeOptions(codec=codec, **options))


def encode(encoder, video: torch.Tensor, chunks=None) -> Path:
    chunks = chunks or [4] * (len(video) // 4 + 1)
    i = 0
    for n in chunks:
        if i < len(video):
            encoder.write(video[i : i + n])
            i += n
    return encoder.finish()


def leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if ".part" in p.name or p.name.startswith("seg-"))


def test_split_is_as_equal_as_the_step_allows_longest_first():
    assert split(321, 2) == [161, 160]
    assert split(321, 3) == [107, 107, 107]
    assert split(10, 3) == [4, 3, 3]
    lengths = split(100, 4, step=3)
    assert sum(lengths) == 100 and lengths == [27, 24, 24, 25]
    assert all(start % 3 == 0 for start in np.cumsum([0, *lengths[:-1]]))
    assert split(5, 8) == [1, 1, 1, 1, 1] and split(7, 1) == [7] and split(7, 3, step=4) == [7]


@pytest.mark.parametrize(("codec", "preset", "dest", "encoders", "frames", "cores", "expected"), [
    ("h264", "veryslow", "o.mp4", "auto", 321, 16, [321]),  # x264 keeps up with the decode: auto never splits it
    ("h265", "medium", "o.mp4", "auto", 321, 16, [321]),  # one x265 keeps up at medium
    ("h265", "slow", "o.mp4", "auto", 321, 16, [107, 107, 107]),  # not at slow: at least 100 frames each
    ("av1", "slow", "o.mp4", "auto", 321, 16, [321]),  # one SVT-AV1 keeps up at preset 5
    ("av1", "veryslow", "o.mp4", "auto", 321, 16, [161, 160]),  # at least 160: where SVT-AV1 puts a keyframe
    ("av1", "veryslow", "o.mp4", "auto", 321, 2, [321]),  # two cores: one encoder uses them as well
    ("av1", "veryslow", "o.mp4", "auto", 159, 16, [159]),  # too short to cut
    ("vp9", "medium", "o.webm", "auto", 257, 16, [128, 129]),  # cuts on whole milliseconds at 16 fps
    ("h264", "medium", "o.mp4", 4, 321, 2, [81, 80, 80, 80]),  # asked for: at most 4, at least 80 frames each
    ("h264", "medium", "o.mp4", 8, 200, 16, [100, 100]),
    ("h264", "medium", "o.mp4", 1, 1000, 16, [1000]),
    ("ffv1", "medium", "o.mkv", 3, 101, 2, [34, 34, 33]),  # Matroska at 16 fps: cuts on even frames (whole ms)
    ("h264_nvenc", "medium", "o.mp4", "auto", 321, 16, [321]),
])
def test_segment_lengths(codec, preset, dest, encoders, frames, cores, expected, monkeypatch):
    monkeypatch.setattr("vaepipe.encode.probe_encoder", lambda encoder: (True, ""))  # NVENC planned, not run
    p = plan(Path(dest), codec, encoders=encoders, preset=preset)
    assert segment_lengths(p, frames, cores) == expected


@pytest.mark.parametrize(("dest", "fps", "step"), [("o.mkv", 16.0, 2), ("o.webm", 24.0, 3), ("o.mkv", 25.0, 1),
                                                   ("o.mkv", 30.0, 3), ("o.mkv", 29.97, 2997), ("o.mp4", 29.97, 1)])
def test_matroska_cuts_only_on_whole_milliseconds(dest, fps, step):
    p = plan_encode(dest, width=W, height=H, fps=fps, options=EncodeOptions(codec="vp9" if "webm" in dest else None))
    assert timestamp_step(p) == step


def test_lossless_segments_give_the_same_frames_and_timestamps_as_one_encoder(tmp_path):
    video = frames(33)
    one = encode(Encoder(plan(tmp_path / "one.mkv", "ffv1", pix_fmt="rgb24")), video)
    seg = encode(SegmentedEncoder(plan(tmp_path / "seg.mkv", "ffv1", pix_fmt="rgb24"), [12, 12, 9]), video)
    assert np.array_equal(read_video(seg), video.numpy()) and np.array_equal(read_video(one), video.numpy())
    assert [t for t, _ in frame_times(seg)] == [t for t, _ in frame_times(one)]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("dest", "codec"), [("o.mp4", "h264"), ("o.mkv", "h264"), ("o.mp4", "h265"),
                                             ("o.webm", "vp9")])
def test_joined_stream_keeps_every_frame_time_with_a_keyframe_per_segment(tmp_path, dest, codec):
    video = frames(40)
    one = encode(Encoder(plan(tmp_path / f"one-{dest}", codec, preset="ultrafast")), video)
    seg = encode(SegmentedEncoder(plan(tmp_path / f"seg-{dest}", codec, preset="ultrafast"), [16, 16, 8]), video)
    times_one, times_seg = frame_times(one), frame_times(seg)
    assert len(times_seg) == 40 and [t for t, _ in times_seg] == [t for t, _ in times_one]
    if dest.endswith(".mp4"):  # Matroska rounds to milliseconds, the same for both
        assert [t for t, _ in times_seg] == [Fraction(i, 16) for i in range(40)]
    assert {0, 16, 32} <= {i for i, (_, key) in enumerate(times_seg) if key}
    # The same pictures in the same order, up to the codec's loss: each decodes nearest to its own source frame.
    source, decoded = video.numpy().astype(int), read_video(seg).astype(int)
    nearest = [int(np.argmin([np.abs(frame - other).mean() for other in source])) for frame in decoded]
    assert nearest == list(range(40))


def test_same_bytes_whatever_the_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "QUEUE_BYTES", 3 * H * W * 3)  # the writer waits on slow segments too
    video = frames(48)
    hashes = set()
    for run in range(3):
        rng = random.Random(run)
        chunks = [rng.choice((1, 3, 4, 7)) for _ in range(48)]
        encoder = SegmentedEncoder(plan(tmp_path / "o.mp4", preset="ultrafast"), [16, 16, 16])
        real_write = encoder._segments[1].write

        def slow_write(piece, real_write=real_write, rng=rng):
            time.sleep(rng.random() * 0.01)
            real_write(piece)

        encoder._segments[1].write = slow_write
        hashes.add(output_sha256(encode(encoder, video, chunks)))
    assert len(hashes) == 1


def test_more_or_fewer_frames_than_planned_still_make_one_whole_file(tmp_path):
    more = encode(SegmentedEncoder(plan(tmp_path / "more.mkv", "ffv1", pix_fmt="rgb24"), [8, 8]), frames(20))
    assert np.array_equal(read_video(more), frames(20).numpy())
    fewer = encode(SegmentedEncoder(plan(tmp_path / "fewer.mkv", "ffv1", pix_fmt="rgb24"), [8, 8, 8]), frames(10))
    assert np.array_equal(read_video(fewer), frames(10).numpy())
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []


def test_killed_segment_encoder_leaves_no_partial_file_and_no_ffmpeg(tmp_path):
    encoder = SegmentedEncoder(plan(tmp_path / "o.mp4", preset="ultrafast"), [8, 8, 8])
    deadline = time.monotonic() + 10
    while len(ffmpeg_processes_under(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # each ffmpeg has been started; /proc shows its command line once it has exec'd
    assert len(ffmpeg_processes_under(tmp_path)) == 3
    encoder.write(frames(10))
    encoder._segments[1]._proc.kill()
    with pytest.raises(VaepipeError, match="ffmpeg"):
        try:
            for _ in range(20):  # the failure surfaces on a later write or at the latest in finish()
                encoder.write(frames(4))
                time.sleep(0.02)
            encoder.finish()
        except VaepipeError:
            encoder.abort()  # what the lanes do when their sink raises
            raise
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []
    assert not (tmp_path / "o.mp4").exists()


def test_abort_mid_stream_as_on_ctrl_c_leaves_nothing(tmp_path):
    (tmp_path / "o.mp4").write_bytes(b"an older video")
    encoder = SegmentedEncoder(plan(tmp_path / "o.mp4", preset="ultrafast"), [8, 8, 8])
    encoder.write(frames(12))
    encoder.abort()
    encoder.abort()  # twice: the lanes and the runner may both call it
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []
    assert (tmp_path / "o.mp4").read_bytes() == b"an older video"  # replaced only by a whole new one


def test_failed_join_as_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    real = os.environ.get("IMAGEIO_FFMPEG_EXE") or __import__("imageio_ffmpeg").get_ffmpeg_exe()
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    # The segment encoders run; the join (the concat demuxer) fails as a full disk would make it.
    fake.write_text(f'#!/bin/sh\ncase "$*" in *concat*) echo "out.mp4: No space left on device" >&2; exit 1;; esac\n'
                    f'exec "{real}" "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    encoder = SegmentedEncoder(plan(tmp_path / "o.mp4", preset="ultrafast"), [8, 8])
    with pytest.raises(VaepipeError, match="No space left on device"):
        encode(encoder, frames(16))
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.mp4").exists()
    assert ffmpeg_processes_under(tmp_path) == []


def test_png_sequences_and_bad_values_are_refused_before_any_work(tmp_path):
    with pytest.raises(BadInput, match="PNG sequence"):
        plan(tmp_path / "frames" / "%05d.png", encoders=4)
    with pytest.raises(BadInput, match="encoders must be auto or a number in 1..64, got 0"):
        EncodeOptions(encoders=0)
    assert EncodeOptions(encoders="3").encoders == 3
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "o.mp4"), "--encoders",
                                      "many"])
    assert result.exit_code == 2 and "encoders must be auto or a number" in result.output


def test_cli_decode_with_encoders_matches_one_encoder_frame_for_frame(tmp_path):
    write_latents(tmp_path / "lat.pt", (16, 9, 2, 3))  # 33 frames: two ffv1 segments (16 frames at least)
    outs = {}
    for n in ("1", "4"):
        result = CliRunner().invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / f"o{n}.mkv"), "--vae",
                                          "random:wan2.1-tiny", "--codec", "ffv1", "--pix-fmt", "rgb24",
                                          "--encoders", n, "--json", "-q"])
        assert result.exit_code == 0, result.output
        outs[n] = result.stdout
    assert '"encoders": 2' in outs["4"] and '"encoders": 1' in outs["1"]
    assert np.array_equal(read_video(tmp_path / "o1.mkv"), read_video(tmp_path / "o4.mkv"))
    assert frame_times(tmp_path / "o1.mkv") != [] and leftovers(tmp_path) == []


def test_sigterm_mid_segmented_run_leaves_no_partial_file_and_no_ffmpeg(tmp_path):
    write_latents(tmp_path / "lat.pt", (16, 200, 6, 10))
    proc = start_vaepipe("decode", str(tmp_path / "lat.pt"), str(tmp_path / "out.mkv"), "--vae", "random:wan2.1-tiny",
                         "--device", "cpu", "--codec", "ffv1", "--encoders", "4", "-q", stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(ffmpeg_processes_under(tmp_path)) < 4 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.mkv.vaepipe-*.part")), "the segments' folder should exist mid-decode"
    proc.send_signal(signal.SIGTERM)  # Ctrl-C takes the same path (cli._terminate raises KeyboardInterrupt)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read()
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []
    assert not (tmp_path / "out.mkv").exists()
