"""The Python API: latents from a diffusers pipeline into video with the pipeline's own VAE. Checked against the
pipeline's own frames and against the CLI's bytes for the same latents."""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vaepipe
from vaepipe import runner as runner_module
from vaepipe.cli import app

from conftest import diffusers_frames, read_tags, read_video, tiny_vae

ROOT = Path(__file__).resolve().parents[1]
LOSSLESS = dict(codec="ffv1", pix_fmt="rgb24")
cli = CliRunner()


def cli_decode(*args) -> None:
    result = cli.invoke(app, ["decode", *map(str, args), "-q"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def example():
    """examples/diffusers_wan.py, imported: its tiny pipeline is a real diffusers WanPipeline."""
    pytest.importorskip("transformers", reason="a diffusers WanPipeline needs transformers for its text encoder")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import diffusers_wan
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return diffusers_wan


def generate(pipe, seed: int, output_type: str, prompt: str = "a cat surfing"):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type=output_type, height=32,
                width=48, num_frames=9, num_inference_steps=2, max_sequence_length=16)


@pytest.mark.slow
def test_a_wan_pipelines_latents_give_the_pipelines_own_frames_byte_for_byte(tmp_path, example):
    pipe = example.tiny_pipeline()
    latents = generate(pipe, 3, "latent").frames
    summary = vaepipe.export_video(latents, tmp_path / "out.mkv", pipe=pipe, fps=16, **LOSSLESS)
    want = np.stack([np.asarray(f) for f in generate(pipe, 3, "pil").frames[0]])  # what export_to_video would get
    assert summary["outputs"][0]["frames"] == 9
    assert np.array_equal(read_video(tmp_path / "out.mkv"), want)


@pytest.mark.slow
def test_the_example_writes_what_the_cli_writes_for_the_same_latents_byte_for_byte(tmp_path, example):
    outputs = example.main(["--tiny", "--clips", "2", "--seed", "5", "--out", str(tmp_path / "api")])
    pipe = example.tiny_pipeline()
    pipe.vae.save_pretrained(tmp_path / "vae")  # the CLI loads the very weights the example's pipeline used
    for i, output in enumerate(outputs):
        latents = generate(pipe, 5 + i, "latent", prompt="a cat surfing on the moon").frames
        torch.save({"latents": latents, "fps": 16, "prompt": "a cat surfing on the moon", "seed": 5 + i,
                    "model": "tiny random WanPipeline"}, tmp_path / f"clip{i}.pt")
        cli_decode(tmp_path / f"clip{i}.pt", tmp_path / f"cli{i}.mp4", "--vae", tmp_path / "vae", "--device", "cpu")
        assert output.read_bytes() == (tmp_path / f"cli{i}.mp4").read_bytes()
    assert outputs[0].read_bytes() != outputs[1].read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_api_and_cli_write_the_same_bytes_with_audio_and_tags(tmp_path, batch):
    from vaepipe.encode import ffmpeg_exe

    audio = tmp_path / "a.wav"
    import subprocess

    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=frequency=330:duration=2", str(audio)],
                   check=True)
    z = torch.randn(batch, 16, 3, 3, 4, generator=torch.Generator().manual_seed(batch))
    tags = {"prompt": "a red fox" if batch == 1 else ["a fox", "a cat", "a dog"], "seed": 7}  # one per sample
    vaepipe.export_video(z, tmp_path / "api.mp4", vae=tiny_vae(), fps=12, crf=20, audio=audio, metadata=tags)
    torch.save({"latents": z, "fps": 12, **tags}, tmp_path / "lat.pt")
    cli_decode(tmp_path / "lat.pt", tmp_path / "cli.mp4", "--vae", "random:wan2.1-tiny", "--device", "cpu", "--crf",
               "20", "--audio", audio)
    names = ["api.mp4"] if batch == 1 else [f"api_{b}.mp4" for b in range(batch)]
    for name in names:
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("api", "cli")).read_bytes()
    assert read_tags(tmp_path / names[-1])["title"] == ("a red fox" if batch == 1 else "a dog")


def test_latents_on_another_device_and_dtype_are_moved_like_the_pipeline_moves_them(tmp_path):
    vae = tiny_vae()
    z = torch.randn(1, 16, 2, 3, 3)
    vaepipe.export_video(z.to(torch.bfloat16), tmp_path / "a.mkv", vae=vae, **LOSSLESS)
    want = diffusers_frames(vae, z.to(torch.bfloat16))  # the pipeline casts to the VAE's dtype, then denormalises
    assert np.array_equal(read_video(tmp_path / "a.mkv"), want)


def test_the_pipeline_output_object_itself_is_taken(tmp_path):
    class Output:  # what pipe(...) returns with output_type="latent"
        frames = torch.randn(1, 16, 2, 3, 3)

    vae = tiny_vae()
    vaepipe.export_video(Output(), tmp_path / "a.mkv", vae=vae, **LOSSLESS)
    assert np.array_equal(read_video(tmp_path / "a.mkv"), diffusers_frames(vae, Output.frames))


def test_wait_false_returns_while_ffmpeg_still_finishes(tmp_path, monkeypatch):
    release = threading.Event()
    finish = runner_module.Streamed.finish

    def held_finish(self):
        release.wait(timeout=30)
        return finish(self)

    monkeypatch.setattr(runner_module.Streamed, "finish", held_finish)
    with vaepipe.Exporter(vae=tiny_vae()) as exporter:
        pending = exporter.export(torch.randn(16, 2, 3, 3), tmp_path / "a.mp4", wait=False)
        assert isinstance(pending, vaepipe.Pending) and not pending.done()
        assert not (tmp_path / "a.mp4").exists()  # every frame decoded, the file not yet in place
        release.set()
        summary = pending.result(timeout=30)
    assert summary["outputs"][0]["bytes"] == (tmp_path / "a.mp4").stat().st_size
    assert pending.outputs == [tmp_path / "a.mp4"]


def test_one_exporter_keeps_its_buffers_and_leaving_the_block_waits_for_every_file(tmp_path):
    with vaepipe.Exporter(vae=tiny_vae()) as exporter:
        exporter.export(torch.randn(16, 2, 3, 3), tmp_path / "a.mp4", wait=False)
        vram = [t.data_ptr() for t in exporter._session.buffers.vram]
        for name in "bcd":
            exporter.export(torch.randn(16, 2, 3, 3), tmp_path / f"{name}.mp4", wait=False)
        assert [t.data_ptr() for t in exporter._session.buffers.vram] == vram  # allocated once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]


def test_a_failure_while_finishing_raises_from_result_and_leaves_no_file(tmp_path, monkeypatch):
    from vaepipe import encode

    def full_disk(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(encode.Encoder, "_publish", full_disk)
    with vaepipe.Exporter(vae=tiny_vae()) as exporter:
        pending = exporter.export(torch.randn(16, 2, 3, 3), tmp_path / "a.mp4", metadata={"prompt": "a cat"},
                                  wait=False)
        with pytest.raises(vaepipe.VaepipeError, match="No space left"):
            pending.result(timeout=60)
    assert not list(tmp_path.iterdir())  # neither the temporary video nor its tags file


def test_an_exporter_used_after_close_says_so_and_writes_nothing(tmp_path):
    exporter = vaepipe.Exporter(vae=tiny_vae())
    exporter.close()
    with pytest.raises(vaepipe.VaepipeError, match="closed"):
        exporter.export(torch.randn(16, 2, 3, 3), tmp_path / "a.mp4")
    assert not list(tmp_path.iterdir())


def test_an_offloaded_vae_is_brought_in_by_its_hook_before_decoding(tmp_path):
    vae = tiny_vae()
    calls = []

    class Hook:  # what enable_model_cpu_offload() attaches; diffusers calls it before vae.decode
        def pre_forward(self, module):
            calls.append(module)

    vae._hf_hook = Hook()
    vaepipe.export_video(torch.randn(16, 2, 3, 3), tmp_path / "a.mp4", vae=vae)
    assert calls == [vae]


@pytest.mark.parametrize("latents, options, words", [
    (torch.randn(48, 2, 3, 3), {}, "latents have 48 channels but the VAE expects 16"),
    (torch.full((16, 2, 3, 3), float("nan")), {}, "NaN or Inf"),
    (torch.randn(16, 3, 3), {}, "must be [C, T, H, W] or [B, C, T, H, W]"),
    ([np.zeros((8, 8, 3), np.uint8)], {}, 'output_type="latent"'),
    (torch.randn(16, 2, 3, 3), {"codec": "divx"}, "codec must be one of h264"),
    (torch.randn(16, 2, 3, 3), {"crf": 60}, "crf must be in 0..51 for h264, got 60"),
    (torch.randn(16, 2, 3, 3), {"audio": "missing.wav"}, "audio file 'missing.wav' does not exist"),
    (torch.randn(16, 2, 3, 3), {"metadata": {"bad key": "x"}}, "is not a tag name"),
    (torch.randn(16, 2, 3, 3), {"metadata": {"title": "x"}, "no_metadata": True}, "drop one"),
    (torch.randn(48, 2, 3, 3), {}, "pass the matching vae= (or pipe=)"),
    (torch.randn(16, 2, 3, 3, device="meta"), {}, "latents are on the meta device"),
    (torch.randn(16, 2, 3, 3).to_sparse(), {}, "must be a dense tensor, got a torch.sparse_coo one"),
    (torch.randn(16, 2, 3, 3), {"output": b"out.mp4"}, "output must be a path as str or pathlib.Path, got bytes"),
    (torch.randn(16, 2, 3, 3), {"crf": "18"}, "crf must be an integer, got '18'"),
    (torch.randn(16, 2, 3, 3), {"fps": "24"}, "fps must be a number, got '24'"),
    (torch.randn(16, 2, 3, 3), {"chunk": 1.5}, "chunk must be an integer, got 1.5"),
    (torch.randn(16, 2, 3, 3), {"output": "o.webm", "codec": "h264"}, "or another codec="),
])
def test_bad_input_raises_badinput_in_pythons_words_and_writes_nothing(tmp_path, latents, options, words):
    """The CLI's checks and sentences, naming the API's arguments (vae=, pad=False), never the CLI's (--vae)."""
    where = options.pop("output", "out.mp4")
    with pytest.raises(vaepipe.BadInput) as caught:
        vaepipe.export_video(latents, tmp_path / where if isinstance(where, str) else where, vae=tiny_vae(), **options)
    assert words in str(caught.value) and "--" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_cli_options_in_messages_become_the_apis_arguments():
    from vaepipe.api import python_words

    assert python_words("drop --no-pad to pad, or use --pix-fmt yuv444p; pass the matching --vae") == (
        "drop pad=False to pad, or use pix_fmt= yuv444p; pass the matching vae= (or pipe=)")
    assert python_words("cannot write '/tmp/a--b/x.mp4'") == "cannot write '/tmp/a--b/x.mp4'"


def test_the_vae_or_the_pipe_one_of_the_two():
    z = torch.randn(16, 2, 3, 3)
    with pytest.raises(vaepipe.BadInput, match="one of the two"):
        vaepipe.export_video(z, "out.mp4")
    with pytest.raises(vaepipe.BadInput, match="one of the two"):
        vaepipe.export_video(z, "out.mp4", vae=tiny_vae(), pipe=object())
    with pytest.raises(vaepipe.BadInput, match="has no .vae"):
        vaepipe.export_video(z, "out.mp4", pipe=object())
    with pytest.raises(vaepipe.BadInput, match="diffusers video VAE"):
        vaepipe.export_video(z, "out.mp4", vae=torch.nn.Linear(2, 2))


def test_the_package_exports_only_the_public_names():
    assert sorted(vaepipe.__all__) == ["BadInput", "Exporter", "Pending", "VaepipeError", "__version__",
                                       "export_video"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset, dtype, size, exact", [("random:wan2.1-tiny", "fp32", (3, 6, 10), True),
                                                        ("random:wan2.1", "bf16", (5, 60, 104), False)])
def test_api_on_cuda_writes_the_clis_bytes(tmp_path, preset, dtype, size, exact):
    from vaepipe.vae import DTYPES, load_vae

    vae = load_vae(preset, dtype=DTYPES[dtype], device=torch.device("cuda")).model  # stands in for pipe.vae
    z = torch.randn(1, 16, *size, device="cuda")  # where the pipeline leaves its latents
    vaepipe.export_video(z, tmp_path / "api.mkv", vae=vae, exact=exact, **LOSSLESS)
    torch.save(z.cpu(), tmp_path / "lat.pt")
    cli_decode(tmp_path / "lat.pt", tmp_path / "cli.mkv", "--vae", preset, "--device", "cuda", "--dtype", dtype,
               "--codec", "ffv1", "--pix-fmt", "rgb24", *(["--exact"] if exact else []))
    assert (tmp_path / "api.mkv").read_bytes() == (tmp_path / "cli.mkv").read_bytes()
    if exact:  # an fp32 VAE, as diffusers' Wan examples load it: the pipeline's own frames
        assert np.array_equal(read_video(tmp_path / "api.mkv"), diffusers_frames(vae, z))
