"""`vaepipe decode` end to end: real files, real ffmpeg, compared with diffusers frame for frame."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe import __version__
from vaepipe.cli import app

from conftest import diffusers_frames, read_video, tiny_vae, write_latents

runner = CliRunner()
LOSSLESS = ["--codec", "ffv1", "--pix-fmt", "rgb24", "--device", "cpu", "--dtype", "fp32", "-q"]


def decode(*args: str):
    result = runner.invoke(app, ["decode", *map(str, args)])
    return result


@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
def test_video_equals_diffusers_decode_and_postprocess_byte_for_byte(tmp_path, preset):
    channels = 48 if "2.2" in preset else 16
    z = write_latents(tmp_path / "lat.pt", (channels, 4, 3, 5), seed=1)
    out = tmp_path / "out.mkv"
    result = decode(tmp_path / "lat.pt", out, "--vae", preset, *LOSSLESS)
    assert result.exit_code == 0, result.output
    got = read_video(out)
    want = diffusers_frames(tiny_vae(preset), z[None])
    assert got.shape == want.shape == (13, want.shape[1], want.shape[2], 3)  # 1 + 4 * (4 - 1) frames, in order
    assert np.array_equal(got, want)


def test_sync_pipelined_three_buffers_and_chunks_write_identical_files(tmp_path, latents_file):
    outputs = {}
    for name, extra in {"pipelined": [], "sync": ["--sync"], "buffers3": ["--buffers", "3"],
                        "chunk2": ["--chunk", "2"]}.items():
        out = tmp_path / f"{name}.mkv"
        result = decode(latents_file, out, "--vae", "random:wan2.1-tiny", *LOSSLESS, *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = out.read_bytes()
    assert len(set(outputs.values())) == 1


def test_batch_of_two_writes_one_video_per_sample(tmp_path):
    z = write_latents(tmp_path / "lat.pt", (2, 16, 2, 3, 4), seed=2)
    result = decode(tmp_path / "lat.pt", tmp_path / "out.mkv", "--vae", "random:wan2.1-tiny", *LOSSLESS)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out.mkv").exists()
    vae = tiny_vae()
    for b in range(2):
        assert np.array_equal(read_video(tmp_path / f"out_{b}.mkv"), diffusers_frames(vae, z[b : b + 1]))


def test_every_latents_format_gives_the_same_video(tmp_path):
    from safetensors.torch import save_file

    z = torch.randn(16, 2, 2, 3)
    torch.save(z, tmp_path / "a.pt")
    save_file({"latents": z}, str(tmp_path / "b.safetensors"))
    np.save(tmp_path / "c.npy", z.numpy())
    videos = set()
    for name in ("a.pt", "b.safetensors", "c.npy"):
        result = decode(tmp_path / name, tmp_path / f"{name}.mkv", "--vae", "random:wan2.1-tiny", *LOSSLESS)
        assert result.exit_code == 0, result.output
        videos.add((tmp_path / f"{name}.mkv").read_bytes())
    assert len(videos) == 1


def test_no_denormalize_takes_raw_latents(tmp_path):
    vae = tiny_vae()
    z = torch.randn(1, 16, 2, 2, 3)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    raw = z / (1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)) + mean
    torch.save(z, tmp_path / "norm.pt")
    torch.save(raw, tmp_path / "raw.pt")
    assert decode(tmp_path / "norm.pt", tmp_path / "a.mkv", "--vae", "random:wan2.1-tiny", *LOSSLESS).exit_code == 0
    assert decode(tmp_path / "raw.pt", tmp_path / "b.mkv", "--vae", "random:wan2.1-tiny", "--no-denormalize",
                  *LOSSLESS).exit_code == 0
    assert np.array_equal(read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv"))


def test_png_sequence_holds_every_frame_in_order(tmp_path, latents_file):
    z = torch.load(latents_file)["latents"]
    result = decode(latents_file, tmp_path / "frames" / "%05d.png", "--vae", "random:wan2.1-tiny", "--device",
                    "cpu", "--dtype", "fp32", "-q")
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "frames").iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(9)]
    assert np.array_equal(read_video(tmp_path / "frames" / "%05d.png"), diffusers_frames(tiny_vae(), z[None]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_h264_mp4_has_bt709_tags_and_the_fps_of_the_latents_file(tmp_path, latents_file):
    import subprocess

    from vaepipe.encode import ffmpeg_exe

    result = decode(latents_file, tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(tmp_path / "out.mp4")], capture_output=True,
                           text=True).stderr
    assert "h264" in probe and "yuv420p(tv, bt709, progressive)" in probe and "12 fps" in probe
    assert read_video(tmp_path / "out.mp4").shape == (9, 24, 40, 3)


def test_json_summary_on_stdout(tmp_path, latents_file):
    result = runner.invoke(app, ["decode", str(latents_file), str(tmp_path / "o.mkv"), "--vae",
                                 "random:wan2.1-tiny", "--codec", "ffv1", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    (out,) = summary["outputs"]
    assert out["frames"] == 9 and out["bytes"] == (tmp_path / "o.mkv").stat().st_size
    assert set(out["busy_s"]) == {"decode", "copy", "encode"}
    assert 0 < out["decode_utilization"] <= 1.0 and out["mode"] == "pipelined"
    assert "random weights" in out["vae"]


def test_progress_and_summary_name_the_vae_dtype_and_device(tmp_path, latents_file):
    result = runner.invoke(app, ["decode", str(latents_file), str(tmp_path / "o.mkv"), "--vae",
                                 "random:wan2.1-tiny", "--codec", "ffv1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "random:wan2.1-tiny (random weights" in result.output and "float32 on cpu" in result.output
    assert "decode-lane utilization" in result.output


def test_a_diffusers_folder_of_another_family_decodes_as_its_pipeline(tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo
    from diffusers.video_processor import VideoProcessor

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=2,
                                    layers_per_block=1).eval()
    vae.save_pretrained(tmp_path / "model" / "vae")
    z = torch.randn(1, 4, 6, 2, 3)  # 6 latent frames: HunyuanVideo's temporal tiles
    torch.save(z, tmp_path / "lat.pt")
    result = decode(tmp_path / "lat.pt", tmp_path / "o.mkv", "--vae", tmp_path / "model", *LOSSLESS[:-1])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # streamed by tiles, not the whole-clip fallback
    with torch.no_grad():
        video = vae.decode(z / vae.config.scaling_factor).sample
    want = np.stack([np.asarray(f) for f in VideoProcessor().postprocess_video(video, output_type="pil")[0]])
    assert np.array_equal(read_video(tmp_path / "o.mkv"), want)


def test_version_and_short_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"vaepipe {__version__}"
    result = runner.invoke(app, ["decode", "-h"])
    assert result.exit_code == 0 and "--buffers" in result.output


def test_a_png_pattern_never_deletes_files_the_run_did_not_write(tmp_path, latents_file):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "cover.png").write_bytes(b"not ours")
    args = ["--vae", "random:wan2.1-tiny", "--device", "cpu", "-q"]
    assert decode(latents_file, frames / "%05d.png", *args).exit_code == 0  # 9 frames
    assert decode(latents_file, frames / "%05d.png", *args).exit_code == 0  # the same names: replaced
    nine = sorted(p.name for p in frames.iterdir())
    assert nine == [f"{i:05d}.png" for i in range(9)] + ["cover.png"]
    torch.save(torch.randn(16, 2, 3, 5), tmp_path / "short.pt")  # 5 frames: 00005..00008 would stay beside them
    result = decode(tmp_path / "short.pt", frames / "%05d.png", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "holds 4 files named like %05d.png that this clip's 5 frames would not replace" in " ".join(
        result.output.split())
    (frames / "7.png").write_bytes(b"someone's photo")  # matches %d.png, which would write 0.png … 8.png
    assert decode(latents_file, frames / "%d.png", *args).exit_code == 2
    assert sorted(p.name for p in frames.iterdir()) == sorted([*nine, "7.png"])
    assert (frames / "7.png").read_bytes() == b"someone's photo"


def test_info_probes_encoders_with_a_real_encode():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["encoders"]["h264"]["works"] and facts["encoders"]["ffv1"]["works"]
    assert facts["torch"] == torch.__version__ and facts["ffmpeg"]
    if not torch.cuda.is_available():  # listed in ffmpeg's build, but nothing to run it on
        assert not facts["encoders"]["h264_nvenc"]["works"] and facts["encoders"]["h264_nvenc"]["detail"]


def test_cpu_decodes_with_diffusers_own_decoder_and_fast_is_an_accepted_old_flag(tmp_path, latents_file):
    runs = {"default": [], "exact": ["--exact"], "fast": ["--fast"]}
    for name, flags in runs.items():
        result = runner.invoke(app, ["decode", str(latents_file), str(tmp_path / f"{name}.mkv"), "--vae",
                                     "random:wan2.1-tiny", "--json", *flags, *LOSSLESS])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)["outputs"][0]
        assert summary["decoder"] == {"name": "diffusers"} and summary["exact"] == (name == "exact")
    noted = decode(latents_file, tmp_path / "noted.mkv", "--vae", "random:wan2.1-tiny", "--fast", *LOSSLESS[:-1])
    assert noted.exit_code == 0 and "--fast is the default on GPUs now" in noted.output
    want = read_video(tmp_path / "default.mkv")
    assert all(np.array_equal(read_video(tmp_path / f"{n}.mkv"), want) for n in ("exact", "fast"))


def test_exact_and_fast_together_are_bad_input(tmp_path, latents_file):
    result = decode(latents_file, tmp_path / "o.mp4", "--vae", "random:wan2.1-tiny", "--exact", "--fast")
    assert result.exit_code == 2 and "--exact and --fast contradict" in result.output
    assert not (tmp_path / "o.mp4").exists()


def test_decoding_onto_an_existing_file_says_it_replaced_it(tmp_path, latents_file):
    out = tmp_path / "out.mp4"
    first = decode(latents_file, out, "--vae", "random:wan2.1-tiny", "--device", "cpu", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["outputs"][0]["replaced"] is False and "replaced" not in first.stderr
    again = decode(latents_file, out, "--vae", "random:wan2.1-tiny", "--device", "cpu", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["outputs"][0]["replaced"] is True
    lines = [line for line in again.stderr.splitlines() if "replaced" in line]
    assert len(lines) == 1 and "replaced the file that was at" in lines[0]


def test_readme_json_example_has_the_keys_of_the_real_summary(tmp_path, latents_file):
    """The README's --json example is real output (generated, not written by hand): same keys, at every level."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = json.loads(readme.split("### The summary", 1)[1].split("```json\n", 1)[1].split("```", 1)[0])
    result = decode(latents_file, tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output

    def keys(value):
        if isinstance(value, dict):
            return {k: keys(v) for k, v in value.items()}
        return [keys(v) for v in value[:1]] if isinstance(value, list) and value and isinstance(value[0], dict) else 0

    assert keys(example) == keys(json.loads(result.stdout))
