"""Failures mid-run: one clear error, no partial output, no ffmpeg left behind, no lane left hanging."""

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vaepipe import runner as runner_module
from vaepipe.cli import app
from vaepipe.encode import EncodeOptions
from vaepipe.errors import VaepipeError
from vaepipe.runner import DecodeOptions, Session

from conftest import ffmpeg_processes_under, start_vaepipe, write_latents


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".mp4", ".mkv", ".part")]


def test_failing_encoder_exits_1_with_its_message(tmp_path, latents_file, monkeypatch):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nhead -c 1000 >/dev/null\necho 'fake encoder: no space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    result = CliRunner().invoke(app, ["decode", str(latents_file), str(tmp_path / "out.mp4"),
                                      "--vae", "random:wan2.1-tiny", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "no space left on device" in result.output and "Traceback" not in result.output
    assert leftovers(tmp_path) == []


def run_with_hook(tmp_path, latents_file, hook, **options):
    """Decode through the library with a lane hook; return the Session's error and the encoder used."""
    encoders = []

    class Recording(runner_module.Encoder):
        def __init__(self, plan):
            super().__init__(plan)
            encoders.append(self)

    session = Session()
    job = session.prepare(latents_file, tmp_path / "out.mp4", DecodeOptions(vae="random:wan2.1-tiny", **options),
                          EncodeOptions())
    original = runner_module.Encoder
    runner_module.Encoder = Recording
    try:
        with pytest.raises(BaseException) as error:
            session.run(job, jitter=lambda lane: hook(lane, encoders))
    finally:
        runner_module.Encoder = original
    return error.value, encoders[0]


@pytest.mark.parametrize("sync", [False, True])
def test_killed_encoder_leaves_no_partial_file(tmp_path, latents_file, sync):
    calls = []

    def kill_on_second_chunk(lane, encoders):
        if lane == "encode" or (sync and lane == "decode"):
            calls.append(lane)
            if len(calls) == 2:
                encoders[0]._proc.kill()
                encoders[0]._proc.wait()
        return 0.0

    error, encoder = run_with_hook(tmp_path, latents_file, kill_on_second_chunk, sync=sync)
    assert isinstance(error, VaepipeError) and "ffmpeg" in str(error)
    assert encoder._proc.poll() is not None
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []


def test_decode_error_mid_stream_stops_every_lane(tmp_path, latents_file, monkeypatch):
    real = runner_module.decode_stream

    def failing(vae, z):
        stream = real(vae, z)
        yield next(stream)
        yield next(stream)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner_module, "decode_stream", failing)
    result = CliRunner().invoke(app, ["decode", str(latents_file), str(tmp_path / "out.mp4"),
                                      "--vae", "random:wan2.1-tiny", "--device", "cpu"])
    assert result.exit_code == 1 and "illegal memory access" in result.output
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("vaepipe-")] == []


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupt_mid_run_leaves_no_partial_file_and_no_ffmpeg(tmp_path, signum, code):
    write_latents(tmp_path / "lat.pt", (16, 200, 6, 10))
    proc = start_vaepipe("decode", str(tmp_path / "lat.pt"), str(tmp_path / "out.mp4"), "--vae", "random:wan2.1-tiny",
                         "--device", "cpu", "-q", stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.mp4.*.part")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert ffmpeg_processes_under(tmp_path), "ffmpeg should be running mid-decode"
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    assert "interrupted" in proc.stderr.read()
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []


def test_temp_output_of_a_killed_run_is_removed_by_the_next(tmp_path, latents_file):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.mkv.vaepipe-{dead.pid}-0000.part"
    stale.write_bytes(b"half a video")
    result = CliRunner().invoke(app, ["decode", str(latents_file), str(tmp_path / "out.mkv"),
                                      "--vae", "random:wan2.1-tiny", "--codec", "ffv1", "-q"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (tmp_path / "out.mkv").stat().st_size > 0


def test_out_of_memory_is_one_sentence(tmp_path, latents_file, monkeypatch):
    def oom(vae, z):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield

    monkeypatch.setattr(runner_module, "decode_stream", oom)
    result = CliRunner().invoke(app, ["decode", str(latents_file), str(tmp_path / "out.mp4"),
                                      "--vae", "random:wan2.1-tiny"])
    assert result.exit_code == 1 and "out of GPU memory" in result.output and "bf16" in result.output
    assert leftovers(tmp_path) == []
