"""`vaepipe decode` for every family, end to end: the lossless video is byte for byte what the family's diffusers
pipeline makes of the same latents (its own latent transform, `vae.decode`, `postprocess_video`)."""

import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor
from typer.testing import CliRunner

from vaepipe.cli import app

from conftest import read_video, tiny_vae

runner = CliRunner()
LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "rgb24", "--device", "cpu", "--dtype", "fp32", "-q"]


def _mean_std(vae, x):
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.dtype)
    return mean, torch.tensor(vae.config.latents_std).view(shape).to(x.dtype)


# What each pipeline does between its latents (output_type="latent") and vae.decode, written out from its source.
PIPELINES = {
    "random:hunyuanvideo-tiny": (16, 6, lambda vae, x: (x.to(vae.dtype) / vae.config.scaling_factor, {})),
    "random:hunyuanvideo1.5-tiny": (4, 2, lambda vae, x: (x.to(vae.dtype) / vae.config.scaling_factor, {})),
    "random:cogvideox-tiny": (16, 3, lambda vae, x: (1 / vae.config.scaling_factor * x, {})),
    "random:mochi-tiny": (12, 2, lambda vae, x: (x * _mean_std(vae, x)[1] / vae.config.scaling_factor
                                                 + _mean_std(vae, x)[0], {})),
    "random:ltx-tiny": (8, 2, lambda vae, x: (x * vae.latents_std.view(1, -1, 1, 1, 1) / vae.config.scaling_factor
                                              + vae.latents_mean.view(1, -1, 1, 1, 1),
                                              {"temb": torch.tensor([0.0])})),
    "random:ltx2-tiny": (8, 2, lambda vae, x: (x, {})),
    "random:kvae-tiny": (16, 3, lambda vae, x: (x, {})),
    "random:kandinsky6-sr-tiny": (4, 2, lambda vae, x: (x.to(vae.dtype) / vae.config.scaling_factor, {})),
}


def pipeline_frames(preset: str, z: torch.Tensor) -> np.ndarray:
    vae = tiny_vae(preset)
    _, _, transform = PIPELINES[preset]
    with torch.no_grad():
        latents, kwargs = transform(vae, z)
        video = vae.decode(latents, **kwargs).sample
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pil")[0]
    return np.stack([np.asarray(f) for f in frames])


@pytest.mark.parametrize("preset", sorted(PIPELINES))
def test_video_equals_the_familys_pipeline_byte_for_byte(tmp_path, preset):
    channels, frames, _ = PIPELINES[preset]
    z = torch.randn(1, channels, frames, 2, 3, generator=torch.Generator().manual_seed(1))
    torch.save({"latents": z, "fps": 24.0}, tmp_path / "lat.pt")
    result = runner.invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "out.mkv"), "--vae", preset,
                                 *LOSSLESS])
    assert result.exit_code == 0, result.output
    got, want = read_video(tmp_path / "out.mkv"), pipeline_frames(preset, z)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_decode_timestep_comes_from_the_option_over_the_latents_file(tmp_path):
    vae = tiny_vae("random:ltx-tiny")
    z = torch.randn(1, 8, 2, 1, 2, generator=torch.Generator().manual_seed(2))
    torch.save({"latents": z, "decode_timestep": 0.5, "decode_noise_scale": 0.0}, tmp_path / "lat.pt")
    videos = {}
    for name, extra in {"file": [], "option": ["--decode-timestep", "0.9"]}.items():
        out = tmp_path / f"{name}.mkv"
        result = runner.invoke(app, ["decode", str(tmp_path / "lat.pt"), str(out), "--vae", "random:ltx-tiny",
                                     *LOSSLESS, *extra])
        assert result.exit_code == 0, result.output
        videos[name] = read_video(out)
    for name, t in {"file": 0.5, "option": 0.9}.items():
        latents, _ = PIPELINES["random:ltx-tiny"][2](vae, z)
        with torch.no_grad():
            video = vae.decode(latents, torch.tensor([t])).sample
        want = np.stack([np.asarray(f) for f in VideoProcessor().postprocess_video(video, output_type="pil")[0]])
        assert np.array_equal(videos[name], want), name


def said(result) -> str:
    return " ".join(result.output.split())


def test_latents_that_do_not_fit_get_a_sentence_and_exit_2(tmp_path):
    torch.save(torch.randn(1, 13, 16, 2, 3), tmp_path / "cog.pt")  # CogVideoX's own [B, T, C, H, W]
    result = runner.invoke(app, ["decode", str(tmp_path / "cog.pt"), str(tmp_path / "o.mkv"), "--vae",
                                 "random:cogvideox-tiny", *LOSSLESS])
    assert result.exit_code == 2 and "permute(0, 2, 1, 3, 4)" in said(result), result.output
    torch.save(torch.randn(128, 2, 1, 2), tmp_path / "ltx.pt")
    result = runner.invoke(app, ["decode", str(tmp_path / "ltx.pt"), str(tmp_path / "o.mkv"), *LOSSLESS])
    assert result.exit_code == 2 and "fits LTX-Video 0.9 and LTX-2: pass the VAE with --vae" in said(result)
    result = runner.invoke(app, ["decode", str(tmp_path / "ltx.pt"), str(tmp_path / "o.mkv"), "--vae",
                                 "random:ltx-tiny", "--decode-timestep", "2", *LOSSLESS])
    assert result.exit_code == 2 and "decode_timestep must be in 0..1, got 2.0" in said(result)
    assert not list(tmp_path.glob("*.mkv"))


def test_a_vae_that_decodes_whole_says_so(tmp_path):
    torch.save(torch.randn(12, 2, 2, 3), tmp_path / "lat.pt")
    result = runner.invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "o.mkv"), "--vae",
                                 "random:mochi-tiny", "--codec", "ffv1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "AutoencoderKLMochi decodes each clip whole (one decoder call over the whole clip" in said(result)


def test_a_vae_whose_frames_would_come_out_wrong_is_refused(tmp_path):
    from diffusers import AutoencoderKLTemporalDecoder

    AutoencoderKLTemporalDecoder(block_out_channels=(32,), layers_per_block=1, latent_channels=4).save_pretrained(
        tmp_path / "svd")
    torch.save(torch.randn(4, 2, 2, 3), tmp_path / "lat.pt")
    result = runner.invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "o.mkv"), "--vae",
                                 str(tmp_path / "svd"), *LOSSLESS])
    assert result.exit_code == 2, result.output
    assert "cannot decode with AutoencoderKLTemporalDecoder: its latents are per-frame images" in said(result)
    assert not (tmp_path / "o.mkv").exists()
