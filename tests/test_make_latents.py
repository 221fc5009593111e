"""`vaepipe make-latents`: synthetic latents for every preset (its channels and compression) and ComfyUI's .latent,
each decoding end to end."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe.cli import app
from vaepipe.families import PRESETS

from conftest import read_video

runner = CliRunner()
LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "rgb24", "--device", "cpu", "--dtype", "fp32", "-q"]


def invoke(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("preset", sorted(n for n in PRESETS if n.endswith("-tiny")))
def test_make_latents_for_every_preset_decodes_end_to_end(tmp_path, preset):
    family, config = PRESETS[preset]
    with torch.device("meta"):
        model = family.build(config)
    scale, frames = family.spatial_factor(model), family.num_frames(model, 3)
    code, output = invoke("make-latents", tmp_path / "lat.pt", "--vae", preset, "--size",
                          f"{2 * scale}x{3 * scale}x{frames}", "--batch", 2)
    assert code == 0, output
    z = torch.load(tmp_path / "lat.pt")["latents"]
    assert tuple(z.shape) == (2, family.z_dim(model), 3, 2, 3)
    code, output = invoke("decode", tmp_path / "lat.pt", tmp_path / "out.mkv", "--vae", preset, *LOSSLESS)
    assert code == 0, output
    for b in range(2):
        assert read_video(tmp_path / f"out_{b}.mkv").shape == (frames, 2 * scale, 3 * scale, 3)


@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
def test_a_comfyui_latent_decodes_to_the_frames_of_the_same_pt_within_a_level(tmp_path, preset):
    size = "32x48x5" if "2.1" in preset else "64x96x5"
    for name in ("x.latent", "x.pt"):
        code, output = invoke("make-latents", tmp_path / name, "--vae", preset, "--size", size, "--seed", 3)
        assert code == 0, output
        code, output = invoke("decode", tmp_path / name, tmp_path / f"{name}.mkv", "--vae", preset, *LOSSLESS)
        assert code == 0, output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.latent"), framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
    # ComfyUI's `z * std + mean` and diffusers' `z / (1 / std) + mean` round apart by an ulp, which may move a
    # level here and there, no more (as in test_comfyui.py).
    diff = read_video(tmp_path / "x.latent.mkv").astype(int) - read_video(tmp_path / "x.pt.mkv").astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01


@pytest.mark.parametrize(("args", "words"), [
    (["x.pt", "--channels", "128"], "--channels 128 alone does not say which VAE (its compression sets the latent"
                                    " size): pass --vae random:ltx or random:ltx2"),
    (["x.pt", "--vae", "random:ltx-tiny", "--channels", "16"], "--channels 16 does not fit --vae random:ltx-tiny,"
                                                               " whose latents have 8 channels"),
    (["x.pt", "--vae", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"], "--vae takes random:<family>[-tiny]"),
    (["x.latent", "--vae", "random:ltx-tiny", "--size", "64x96x9"], "vaepipe reads ComfyUI .latent files only for"
                                                                    " 16 (Wan 2.1), 48 (Wan 2.2 TI2V-5B)"),
    (["x.mp4"], "use .pt, .safetensors, .npy or .latent"),
])
def test_latents_it_cannot_make_are_refused_with_the_fix(tmp_path, args, words):
    code, output = invoke("make-latents", tmp_path / args[0], *args[1:])
    assert code == 2 and words in output, output
    assert list(tmp_path.iterdir()) == []
