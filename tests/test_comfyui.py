"""ComfyUI's .latent files (SaveLatent): read, decoded as ComfyUI's VAEDecode would take them, their workflow kept."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vaepipe.cli import app

from conftest import diffusers_frames, read_tags, read_video, tiny_vae

runner = CliRunner()
LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "rgb24", "--device", "cpu", "--dtype", "fp32", "-q"]
PROMPT = {"3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 30}},
          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox in the snow"}}}
WORKFLOW = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "version": 0.4}


def save_latent(path, samples: torch.Tensor, *, marker: str | None = "latent_format_version_0", metadata=True):
    """What ComfyUI's SaveLatent writes: the LATENT's samples, an empty version marker, the workflow as JSON text."""
    tensors = {"latent_tensor": samples.contiguous()}
    if marker:
        tensors[marker] = torch.tensor([])
    save_file(tensors, str(path),
              metadata={"prompt": json.dumps(PROMPT), "workflow": json.dumps(WORKFLOW)} if metadata else None)


def comfyui_samples(vae, z: torch.Tensor) -> torch.Tensor:
    """A ComfyUI sampler's LATENT for what a diffusers pipeline leaves as `z`: its Wan latent format's
    process_latent_out on float32 samples, `z * std / 1.0 + mean`, in the VAE's own space."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(shape)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    return z.float() * std / 1.0 + mean


def decode(latents, output, *extra):
    return runner.invoke(app, ["decode", str(latents), str(output), *map(str, extra)])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
def test_a_latent_file_decodes_to_the_frames_of_the_same_latents_saved_as_pt(tmp_path, preset):
    vae = tiny_vae(preset)
    z = torch.randn(2, vae.config.z_dim, 3, 3, 4, generator=torch.Generator().manual_seed(4))
    raw = comfyui_samples(vae, z)
    save_latent(tmp_path / "x.latent", raw)
    torch.save(raw, tmp_path / "raw.pt")
    assert decode(tmp_path / "x.latent", tmp_path / "comfy.mkv", "--vae", preset, *LOSSLESS).exit_code == 0
    result = decode(tmp_path / "raw.pt", tmp_path / "pt.mkv", "--vae", preset, "--no-denormalize", *LOSSLESS)
    assert result.exit_code == 0, result.output
    for b in range(2):
        comfy = read_video(tmp_path / f"comfy_{b}.mkv")
        assert np.array_equal(comfy, read_video(tmp_path / f"pt_{b}.mkv"))
        # And what a diffusers pipeline makes of the normalised latents: ComfyUI's `z * std + mean` and diffusers'
        # `z / (1 / std) + mean` round apart by an ulp, which may move a level here and there, no more.
        diff = comfy.astype(int) - diffusers_frames(vae, z[b : b + 1]).astype(int)
        assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01


def test_the_workflow_goes_into_the_comment_as_json_and_no_title(tmp_path):
    save_latent(tmp_path / "x.latent", torch.randn(1, 16, 2, 3, 3))
    result = decode(tmp_path / "x.latent", tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu",
                    "-q")
    assert result.exit_code == 0, result.output
    tags = read_tags(tmp_path / "out.mp4")
    assert json.loads(tags["comment"]) == {"prompt": PROMPT, "workflow": WORKFLOW}  # as VideoHelperSuite writes it
    assert "title" not in tags  # ComfyUI's "prompt" is the graph it ran, not a text prompt


def test_a_latent_file_without_metadata_decodes_with_no_tags(tmp_path):
    save_latent(tmp_path / "x.latent", torch.randn(1, 16, 2, 3, 3), metadata=False)
    result = decode(tmp_path / "x.latent", tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu",
                    "-q")
    assert result.exit_code == 0, result.output
    assert "comment" not in read_tags(tmp_path / "out.mp4")


@pytest.mark.parametrize("samples, marker, words", [
    (torch.randn(1, 16, 2, 3, 3), "latent_format_version_1", "format version 1, which vaepipe does not know"),
    (torch.randn(1, 16, 2, 3, 3), None, "no latent_format_version_0 marker"),
    (torch.randn(1, 4, 8, 8), "latent_format_version_0", "an image latent, not a video one"),
    (torch.randn(1, 128, 2, 3, 3), "latent_format_version_0", "128 channels"),
    (torch.randn(1, 12, 2, 3, 3), "latent_format_version_0", "16 (Wan 2.1), 48 (Wan 2.2 TI2V-5B)"),
])
def test_unknown_versions_and_channel_counts_are_bad_input(tmp_path, samples, marker, words):
    save_latent(tmp_path / "x.latent", samples, marker=marker)
    result = decode(tmp_path / "x.latent", tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not (tmp_path / "out.mp4").exists()


def test_a_safetensors_file_named_latent_without_latent_tensor(tmp_path):
    save_file({"latents": torch.randn(1, 16, 2, 3, 3)}, str(tmp_path / "x.latent"))
    result = decode(tmp_path / "x.latent", tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu")
    assert result.exit_code == 2 and "is not a ComfyUI latent" in " ".join(result.output.split())


def test_a_latent_file_with_the_wrong_vae_names_the_fix(tmp_path):
    save_latent(tmp_path / "x.latent", torch.randn(1, 48, 2, 3, 3))
    result = decode(tmp_path / "x.latent", tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu")
    assert result.exit_code == 2 and "48 channels but the VAE expects 16" in " ".join(result.output.split())


def test_half_precision_samples_are_taken_as_float32_like_loadlatent(tmp_path):
    vae = tiny_vae()
    raw = comfyui_samples(vae, torch.randn(1, 16, 2, 3, 3)).half()
    save_latent(tmp_path / "x.latent", raw)
    torch.save(raw.float(), tmp_path / "raw.pt")
    assert decode(tmp_path / "x.latent", tmp_path / "a.mkv", "--vae", "random:wan2.1-tiny", *LOSSLESS).exit_code == 0
    assert decode(tmp_path / "raw.pt", tmp_path / "b.mkv", "--vae", "random:wan2.1-tiny", "--no-denormalize",
                  *LOSSLESS).exit_code == 0
    assert np.array_equal(read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv"))
