"""The same exactness and stress specifications on CUDA, also under PyTorch's CUDA sanitizer (CSAN), which fails
on any cross-stream access that no event or synchronisation orders. Skipped without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe.cli import app
from vaepipe.decode import decode_stream
from vaepipe.pipeline import Buffers

from conftest import diffusers_frames, read_video, tiny_vae, write_latents
from lanes import decode_with_lanes, jitter, reference_frames

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
IN_SANITIZER = os.environ.get("TORCH_CUDA_SANITIZER") == "1"


@pytest.mark.parametrize("preset, latent_hw", [("random:wan2.1-tiny", (5, 7)), ("random:wan2.2-tiny", (5, 7)),
                                               ("random:wan2.1", (9, 13)), ("random:wan2.2", (5, 7))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stream_equals_whole_decode_bit_for_bit(preset, latent_hw, dtype):
    vae = tiny_vae(preset, dtype, "cuda")
    z = torch.randn(1, vae.config.z_dim, 5, *latent_hw, device="cuda", dtype=dtype)
    with torch.inference_mode():
        whole = vae.decode(z).sample
        streamed = torch.cat(list(decode_stream(vae, z)), dim=2)
    assert torch.equal(streamed, whole)


@pytest.fixture(scope="module")
def case():
    vae = tiny_vae("random:wan2.1-tiny", torch.float32, "cuda")
    z = torch.randn(1, 16, 9, 24, 32, device="cuda")
    return vae, z, reference_frames(vae, z)


@pytest.mark.parametrize("k, chunk", [(2, 1), (3, 2)])
def test_cuda_lanes_with_random_delays_give_the_reference_frames(case, k, chunk):
    vae, z, want = case
    buffers = Buffers()
    for seed in range(6 if IN_SANITIZER else 15):
        got, stats = decode_with_lanes(vae, z, buffers=buffers, delays=jitter(seed, 0.003), k=k, chunk=chunk)
        assert torch.equal(got, want), f"seed {seed}"
        assert buffers.host[0].is_pinned() and stats.busy_s["copy"] > 0


def test_cuda_sync_mode_gives_the_same_frames(case):
    vae, z, want = case
    got, _ = decode_with_lanes(vae, z, sync=True)
    assert torch.equal(got, want)


@pytest.mark.skipif(IN_SANITIZER, reason="runs the CLI in-process; covered outside the sanitizer")
def test_cli_on_cuda_matches_diffusers_on_cuda_byte_for_byte(tmp_path):
    z = write_latents(tmp_path / "lat.pt", (16, 4, 6, 10), seed=3)
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "o.mkv"), "--vae",
                                      "random:wan2.1-tiny", "--device", "cuda", "--dtype", "fp32", "--codec", "ffv1",
                                      "--pix-fmt", "rgb24", "-q"])
    assert result.exit_code == 0, result.output
    want = diffusers_frames(tiny_vae("random:wan2.1-tiny", torch.float32, "cuda"), z[None])
    assert np.array_equal(read_video(tmp_path / "o.mkv"), want)


def _sanitized(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(IN_SANITIZER, reason="this test starts the sanitized run")
def test_the_sanitizer_catches_an_unsynchronised_stream():
    """Control: the sanitizer is really on, so the next test can fail."""
    racy = ("import torch\nx = torch.zeros(1 << 20, device='cuda')\ns = torch.cuda.Stream()\n"
            "with torch.cuda.stream(s):\n    x.add_(1)\nprint(x.sum())\n")
    run = _sanitized(["-c", racy])
    assert run.returncode != 0 and "CSAN" in run.stderr


@pytest.mark.skipif(IN_SANITIZER, reason="this test starts the sanitized run")
def test_lanes_pass_under_the_cuda_sanitizer():
    run = _sanitized(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k",
                      "random_delays or sync_mode"])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_cuda_fast_path_stays_close_and_leaves_exact_decodes_exact(case):
    from vaepipe.decode import use_fast_path

    vae, z, want = case
    fast = tiny_vae("random:wan2.1-tiny", torch.float32, "cuda")
    use_fast_path(fast)
    got, _ = decode_with_lanes(fast, z)
    assert (got.int() - want.int()).abs().max() <= 8
    assert not torch.backends.cudnn.benchmark  # autotuning was on only inside the fast model's calls
    exact, _ = decode_with_lanes(vae, z)
    assert torch.equal(exact, want)
