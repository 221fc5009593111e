"""Bad input: exit code 2, a message that names the problem and the fix, and nothing written."""

import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe.cli import app
from vaepipe.encode import EncodeOptions, plan_encode
from vaepipe.errors import BadInput

runner = CliRunner()


class Payload:
    """Unpickling this would create a file: loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def refused(tmp_path, latents, *extra, output="out.mp4"):
    result = runner.invoke(app, ["decode", str(latents), str(tmp_path / output), "--vae", "random:wan2.1-tiny",
                                 "--device", "cpu", *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".mkv", ".part", ".png") and p.is_file()]
    return " ".join(result.output.split())


def test_missing_file(tmp_path):
    assert "does not exist" in refused(tmp_path, tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = tmp_path / "lat.pt"
    torch.save(torch.randn(16, 2, 3, 3), path)
    path.write_bytes(path.read_bytes()[:200])
    assert "truncated" in refused(tmp_path, path)


@pytest.mark.parametrize("shape", [(16, 2, 3), (1, 1, 16, 2, 3, 3)])
def test_wrong_rank(tmp_path, shape):
    torch.save(torch.randn(shape), tmp_path / "lat.pt")
    assert "must be [C, T, H, W] or [B, C, T, H, W]" in refused(tmp_path, tmp_path / "lat.pt")


def test_wrong_channels_names_the_vae(tmp_path):
    torch.save(torch.randn(48, 2, 3, 3), tmp_path / "lat.pt")
    message = refused(tmp_path, tmp_path / "lat.pt")
    assert "48 channels but the VAE expects 16" in message and "--vae" in message
    assert "48 channels are those of Wan 2.1 / 2.2 (--vae random:wan2.2 or Wan-AI/Wan2.2-TI2V-5B-Diffusers)" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, bad):
    z = torch.randn(16, 2, 3, 3)
    z[3, 1, 2, 0] = bad
    torch.save(z, tmp_path / "lat.pt")
    assert "1 NaN or Inf values" in refused(tmp_path, tmp_path / "lat.pt")


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"latents": torch.randn(16, 2, 3, 3), "x": Payload(str(marker))}, tmp_path / "lat.pt")
    assert "refused" in refused(tmp_path, tmp_path / "lat.pt")
    assert not marker.exists()


def test_integer_latents(tmp_path):
    np.save(tmp_path / "lat.npy", np.zeros((16, 2, 3, 3), np.int64))
    assert "must be float32, float16 or bfloat16" in refused(tmp_path, tmp_path / "lat.npy")


def test_unknown_codec(tmp_path, latents_file):
    message = refused(tmp_path, latents_file, "--codec", "divx")
    assert "codec must be one of h264" in message and "'divx'" in message


@pytest.mark.parametrize("extra, output, words", [
    (["--codec", "prores"], "out.mp4", "cannot be written to a .mp4 file"),
    (["--codec", "av1", "--pix-fmt", "yuv444p"], "out.mkv", "does not take pix_fmt yuv444p"),
    (["--crf", "60"], "out.mp4", "crf must be in 0..51 for h264, got 60"),
    ([], "out.avi", "cannot tell the container"),
    ([], "still.png", "use a numbered pattern"),
    (["--vae", "random:wan9"], "out.mp4", "unknown preset 'random:wan9'"),
    (["--chunk", "0"], "out.mp4", "chunk must be in 1..64, got 0"),
    (["--dtype", "fp8"], "out.mp4", "dtype must be one of bf16, fp16, fp32"),
])
def test_bad_options(tmp_path, latents_file, extra, output, words):
    assert words in refused(tmp_path, latents_file, *extra, output=output)


def test_uncached_hub_repo_names_the_fix(tmp_path, latents_file, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    message = refused(tmp_path, latents_file, "--vae", "nobody/no-such-vae")
    assert "not in the local Hugging Face cache" in message and "hf download" in message
    assert "to try vaepipe without weights, --vae random:wan2.1-tiny" in message


def test_default_vae_not_cached_offers_the_tiny_preset_of_its_width(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    torch.save(torch.randn(48, 2, 3, 3), tmp_path / "lat.pt")
    result = runner.invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "out.mp4"), "--device", "cpu"])
    assert result.exit_code == 2 and not (tmp_path / "out.mp4").exists(), result.output
    message = " ".join(result.output.split())  # no --vae: Wan 2.2's repo, for 48 channels
    assert "Wan-AI/Wan2.2-TI2V-5B-Diffusers is not in the local Hugging Face cache" in message
    assert "--vae random:wan2.2-tiny" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu(tmp_path, latents_file):
    assert "--device cpu" in refused(tmp_path, latents_file, "--device", "cuda")


def test_odd_frames_with_a_format_that_cannot_pad():
    with pytest.raises(BadInput, match="833x480 but yuv420p needs even sizes"):
        plan_encode("o.mp4", width=833, height=480, fps=16, options=EncodeOptions(pad=False))
    plan = plan_encode("o.mp4", width=833, height=481, fps=16, options=EncodeOptions())
    assert (plan.pad_right, plan.pad_bottom, plan.frame_shape) == (1, 1, (482, 834, 3))
    assert plan_encode("o.mkv", width=833, height=481, fps=16,
                       options=EncodeOptions(codec="ffv1", pad=False)).frame_shape == (481, 833, 3)


def test_an_output_path_that_is_a_folder(tmp_path, latents_file):
    (tmp_path / "out.mp4").mkdir()
    message = refused(tmp_path, latents_file, output="out.mp4")
    assert "is a folder" in message and not list((tmp_path / "out.mp4").iterdir())


@pytest.mark.parametrize("fps", [0, -5, float("nan")])
def test_a_bad_fps_stored_with_the_latents(tmp_path, fps):
    torch.save({"latents": torch.randn(16, 2, 3, 3), "fps": fps}, tmp_path / "lat.pt")
    assert "stored fps must be a number in 0.1..1000" in refused(tmp_path, tmp_path / "lat.pt")


def test_a_batch_of_frame_sequences_needs_a_folder_per_sample(tmp_path, monkeypatch):
    torch.save(torch.randn(2, 16, 2, 3, 3), tmp_path / "lat.pt")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["decode", "lat.pt", "%05d.png", "--vae", "random:wan2.1-tiny", "--device", "cpu"])
    assert result.exit_code == 2 and "put the pattern in a folder" in " ".join(result.output.split())
    assert not list(tmp_path.glob("*.png"))
