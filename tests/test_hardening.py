"""Hostile files, broken weights and a newcomer's rough edges: each is one sentence and exit 2 (nothing written, no
traceback), or works as the user meant."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vaepipe import runner as runner_module
from vaepipe.cli import app

from conftest import start_vaepipe, tiny_vae, write_latents

TINY = ["--vae", "random:wan2.1-tiny", "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def refused(folder: Path, *args: str) -> str:
    """Run the CLI; assert exit 2, no traceback and nothing new under `folder`; return the message on one line."""
    before = files(folder)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert files(folder) == before, sorted(files(folder) - before)
    return " ".join(result.output.split())


@pytest.fixture
def no_vae_load(monkeypatch):
    """Fail the test if the VAE is loaded: the problem must be found before."""
    def load(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the bad input was found")

    monkeypatch.setattr(runner_module, "load_vae", load)


# -- weights -----------------------------------------------------------------------------------------------------
def vae_folder(folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A diffusers VAE folder of the tiny preset whose weights file holds `state` (default: its own weights)."""
    vae = tiny_vae()
    vae.save_pretrained(folder)
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_a_weights_file_without_the_vaes_tensors_is_refused(tmp_path, latents_file):
    vae = vae_folder(tmp_path / "vae", {"unrelated": torch.zeros(3)})
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", "--vae", vae, "--device", "cpu")
    assert "parameters missing from the file: 146 of 146 (decoder.conv_in.bias, decoder.conv_in.weight, …)" in message
    assert "tensors in the file that are not its parameters: 1 (unrelated)" in message
    assert "re-download" in message


def test_half_the_weights_missing_is_refused(tmp_path, latents_file):
    state = tiny_vae().state_dict()
    vae = vae_folder(tmp_path / "vae", {k: v for i, (k, v) in enumerate(sorted(state.items())) if i % 2})
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", "--vae", vae, "--device", "cpu")
    assert "parameters missing from the file: 73 of 146" in message


def test_non_finite_weights_are_refused(tmp_path, latents_file):
    state = tiny_vae().state_dict()
    state["decoder.conv_out.weight"][0, 0, 0, 0, 0] = float("nan")
    vae = vae_folder(tmp_path / "vae", state)
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", "--vae", vae, "--device", "cpu")
    assert "parameters holding NaN or Inf: 1 of 146 (decoder.conv_out.weight)" in message


def test_a_single_file_of_another_vae_is_refused_in_a_few_lines(tmp_path, latents_file):
    # The tiny VAE's weights under diffusers' names, read as the full-size Wan 2.1 VAE they do not fit.
    path = tmp_path / "small_vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items()}, str(path))
    before = files(tmp_path)
    result = invoke("decode", latents_file, tmp_path / "out.mp4", "--vae", path, "--device", "cpu")
    assert result.exit_code == 2 and files(tmp_path) == before
    message = " ".join(result.output.split())
    assert len(message) < 800, message  # not one line per tensor (diffusers' own error: 374 lines)
    assert "tensors of another shape in the file: 124 (decoder.conv_in.bias is [16], not [384]," in message


def test_a_single_file_missing_most_tensors_is_refused(tmp_path, latents_file):
    # Enough to be recognised as a Wan VAE (its post-quant conv), nothing more.
    path = tmp_path / "partial.safetensors"
    save_file({"post_quant_conv.weight": torch.zeros(16, 16, 1, 1, 1), "post_quant_conv.bias": torch.zeros(16)},
              str(path))
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", "--vae", path, "--device", "cpu")
    assert "parameters missing from the file: 192 of 194" in message


# -- sizes before allocation -------------------------------------------------------------------------------------
def test_an_npy_header_declaring_a_huge_shape_is_refused(tmp_path):
    from numpy.lib import format as npy

    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                       "shape": (1, 16, 100000, 100000, 100000)})
        f.write(b"\0" * 64)
    message = refused(tmp_path, "decode", path, tmp_path / "out.mp4", *TINY)
    assert "latents of shape [1, 16, 100000, 100000, 100000] float32 take 56.8 PiB, too much for the" in message


def test_a_tiny_pt_with_an_expanded_huge_tensor_is_refused(tmp_path):
    path = tmp_path / "expanded.pt"
    torch.save(torch.randn(16, 1, 1, 1).expand(16, 1000, 100000, 100000), path)
    assert path.stat().st_size < 4096
    message = refused(tmp_path, "decode", path, tmp_path / "out.mp4", *TINY)
    assert "latents of shape [16, 1000, 100000, 100000] float32 take" in message


def test_frames_too_large_for_memory_are_refused_before_any_buffer(tmp_path, monkeypatch):
    from vaepipe import pipeline

    def setup(*args, **kwargs):
        raise RuntimeError("the frame buffers were allocated")

    monkeypatch.setattr(pipeline.Buffers, "setup", setup)
    path = tmp_path / "wide.pt"
    torch.save(torch.randn(16, 1, 1, 1).expand(16, 1, 3000, 3000), path)  # decodes to 24000x24000 frames
    message = refused(tmp_path, "decode", path, tmp_path / "out.mp4", *TINY)
    assert "frames of 24000x24000 need at least" in message and "is available" in message


def test_make_latents_of_an_absurd_size_is_refused(tmp_path):
    message = refused(tmp_path, "make-latents", tmp_path / "l.pt", "--size", "100000x100000x100001")
    assert "too much for the" in message and "use a smaller size" in message


# -- batch -------------------------------------------------------------------------------------------------------
def batch_folder(folder: Path, body: str) -> Path:
    (folder / "lat").mkdir()
    write_latents(folder / "lat" / "a.pt", (16, 2, 3, 5), fps=12.0)
    path = folder / "batch.toml"
    path.write_text(f'[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\npreset = "ultrafast"\n\n{body}')
    return path


def test_a_suffix_with_folders_cannot_write_outside_output_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    config = batch_folder(work, '[[jobs]]\ninputs = "lat/*.pt"\noutput_dir = "out"\nsuffix = "./../../x.mp4"\n')
    message = refused(tmp_path, "batch", config)
    assert "jobs[0].suffix must be the end of a file name, a dot and no folders" in message
    assert "'./../../x.mp4'" in message


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80\x81\n", b'[defaults]\nvae = "x"\n'],
                         ids=["not-utf8", "not-json-lines"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_manifest_that_is_not_ours_is_refused_and_left_alone(tmp_path, content, dry_run):
    config = batch_folder(tmp_path, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\n')
    manifest = tmp_path / "batch.manifest.jsonl"
    manifest.write_bytes(content)
    message = refused(tmp_path, "batch", config, *(["--dry-run"] if dry_run else []))
    assert "is not a vaepipe manifest" in message and "--manifest" in message
    assert manifest.read_bytes() == content


def test_a_manifest_that_is_a_folder_is_refused(tmp_path):
    config = batch_folder(tmp_path, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\n')
    (tmp_path / "m").mkdir()
    message = refused(tmp_path, "batch", config, "--manifest", tmp_path / "m")
    assert "is a folder: pass --manifest with a file path" in message


def test_torn_and_nul_filled_manifest_lines_are_still_read(tmp_path):
    config = batch_folder(tmp_path, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\n')
    assert invoke("batch", config, "-q").exit_code == 0
    manifest = tmp_path / "batch.manifest.jsonl"
    done = manifest.read_bytes()
    manifest.write_bytes(b'{"job": "jobs[0]", "ind\0\0\0\0' + b"\n" + b"\0" * 64 + done)  # a crash, then a re-run
    result = CliRunner().invoke(app, ["batch", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"]["skipped"] == 1


def test_batch_json_reports_the_model_load_apart_from_the_first_jobs_wall_time(tmp_path, monkeypatch):
    real = runner_module.load_vae

    def slow_load(*args, **kwargs):
        time.sleep(2.0)  # a load that takes long, as a real one does (17 s on a GPU)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "load_vae", slow_load)
    write_latents(tmp_path / "b.pt", (16, 2, 3, 5), seed=1)
    config = batch_folder(tmp_path, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\n'
                                    '[[jobs]]\nlatents = "b.pt"\noutput = "out/b.mp4"\n')
    result = CliRunner().invoke(app, ["batch", str(config), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    first, second = (r["timings"] for r in summary["results"])
    assert first["load_s"] >= 2.0 and second["load_s"] == 0.0
    assert first["wall_s"] <= summary["wall_after_load_s"]


# -- overrides ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt-nan", "pt-text", "safetensors-text"])
def test_fps_overrides_a_bad_stored_fps(tmp_path, fmt):
    z = torch.randn(16, 2, 3, 5)
    if fmt.startswith("pt"):
        path = tmp_path / "lat.pt"
        torch.save({"latents": z, "fps": float("nan") if fmt == "pt-nan" else "abc"}, path)
    else:
        path = tmp_path / "lat.safetensors"
        save_file({"latents": z}, str(path), metadata={"fps": "abc"})
    assert "pass --fps to override it" in refused(tmp_path, "decode", path, tmp_path / "out.mp4", *TINY)
    result = invoke("decode", path, tmp_path / "out.mp4", *TINY, "--fps", "10", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"][0]["fps"] == 10.0


def test_fps_in_a_batch_job_overrides_a_bad_stored_fps(tmp_path):
    config = batch_folder(tmp_path, '[[jobs]]\nlatents = "bad.safetensors"\noutput = "out/a.mp4"\nfps = 10\n')
    save_file({"latents": torch.randn(16, 2, 3, 5)}, str(tmp_path / "bad.safetensors"), metadata={"fps": "nan"})
    result = CliRunner().invoke(app, ["batch", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"]["done"] == 1


# -- fail fast, clear messages -----------------------------------------------------------------------------------
def test_a_wrong_rank_message_shows_the_shape_not_an_expression(tmp_path):
    torch.save(torch.randn(6, 10), tmp_path / "lat.pt")
    message = refused(tmp_path, "decode", tmp_path / "lat.pt", tmp_path / "out.mp4", *TINY)
    assert "got shape [6, 10]" in message and "tuple(" not in message and " = " not in message


class Plain:
    """Not a tensor: torch's restricted unpickler refuses it (with a long, coloured message)."""


def test_a_refused_pickle_is_one_clean_sentence(tmp_path):
    torch.save({"latents": torch.randn(16, 2, 3, 3), "extra": Plain()}, tmp_path / "lat.pt")
    result = invoke("decode", tmp_path / "lat.pt", tmp_path / "out.mp4", *TINY)
    assert result.exit_code == 2
    assert "\x1b" not in result.output and "[1m" not in result.output
    loading, *rest = result.output.splitlines()  # the line said at once, before torch loads; then the error
    message = " ".join(" ".join(rest).split())
    assert loading.startswith("loading") and message.startswith("error: refused to load")
    assert "(test_hardening.Plain)" in message
    assert message.endswith("save plain tensors (a tensor, or a dict of tensors and numbers)")


@pytest.mark.parametrize(("output", "extra", "words"), [
    ("out.mp4", [], "crf must be in 0..51 for h264, got 70"),  # the codec from the extension
    ("out.webm", [], "crf must be in 0..63 for vp9, got 70"),
    ("out.mkv", ["--codec", "av1"], "crf must be in 0..63 for av1, got 70"),
])
def test_crf_out_of_range_names_the_chosen_codecs_range_only(tmp_path, latents_file, output, extra, words):
    message = refused(tmp_path, "decode", latents_file, tmp_path / output, *TINY, "--crf", "70", *extra)
    assert words in message and "h265" not in message and "nvenc" not in message


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nobody can write to here (chmod for a user; as root, a folder of /sys, which root cannot write)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
        folder.chmod(0o755)
        return
    (folder / "probe").unlink()
    folder.chmod(0o755)
    try:
        (Path("/sys/fs") / "vaepipe-probe").touch()
    except OSError:
        yield Path("/sys/fs")
        return
    pytest.skip("no unwritable folder on this machine")


def test_an_unwritable_output_folder_is_reported_before_the_vae_loads(tmp_path, latents_file, unwritable,
                                                                       no_vae_load):
    message = refused(tmp_path, "decode", latents_file, unwritable / "videos" / "out.mp4", *TINY)
    assert f"the folder '{unwritable}' is not writable" in message


def test_an_output_under_a_file_is_reported_before_the_vae_loads(tmp_path, latents_file, no_vae_load):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    message = refused(tmp_path, "decode", latents_file, tmp_path / "notes.txt" / "out.mp4", *TINY)
    assert "notes.txt' is a file, not a folder" in message


def test_a_bench_shape_that_does_not_fit_is_reported_before_the_vae_loads(tmp_path, no_vae_load):
    message = refused(tmp_path, "bench", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--shape", "50x80x9",
                      "--out", tmp_path / "bench")
    assert "size 50x80x9 does not fit the VAE" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_info_says_plainly_that_there_is_no_gpu():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    gpu = next(line for line in result.output.splitlines() if line.strip().startswith("gpu:"))
    assert "none:" in gpu and "runs on the CPU" in gpu and "GiB" not in gpu


# -- Ctrl-C during start-up --------------------------------------------------------------------------------------
@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(signals):
    proc = start_vaepipe("info", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # importing torch: start-up
        assert proc.poll() is None
        time.sleep(0.01)
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip() == "interrupted: no partial output was left behind"


@pytest.mark.skipif(importlib.util.find_spec("imageio") is None, reason="naive mode needs imageio")
def test_running_out_of_memory_in_bench_is_one_sentence(tmp_path, monkeypatch):
    from vaepipe.bench import modes

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 57.00 GiB")

    monkeypatch.setattr(modes, "naive_job", oom)  # diffusers' whole-clip decode, which vaepipe cannot bound
    result = invoke("bench", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--shape", "16x16x5", "--runs", "1",
                    "--modes", "naive", "--content", "noise", "--out", tmp_path / "bench")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "out of memory (CUDA out of memory. Tried to allocate 57.00 GiB)" in " ".join(result.output.split())


# -- on a GPU ----------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_frames_too_large_for_the_gpu_are_refused_before_any_buffer(tmp_path, monkeypatch):
    from vaepipe import pipeline

    def setup(*args, **kwargs):
        raise RuntimeError("the frame buffers were allocated")

    monkeypatch.setattr(pipeline.Buffers, "setup", setup)
    path = tmp_path / "wide.pt"
    torch.save(torch.randn(16, 1, 1, 1).expand(16, 1, 3000, 3000), path)  # 24000x24000 frames
    message = refused(tmp_path, "decode", path, tmp_path / "out.mp4", "--vae", "random:wan2.1-tiny", "--device", "cuda")
    assert "frames of 24000x24000 need at least" in message and "of GPU memory on cuda:0" in message


@pytest.mark.gpu
@needs_gpu
def test_the_memory_floor_is_below_a_real_decodes_peak_on_the_gpu(tmp_path):
    """The check refuses only what cannot fit: Wan 2.1 at 480x832x81 in bf16 passes it, and really needs more."""
    from vaepipe.encode import EncodeOptions
    from vaepipe.memory import decode_need
    from vaepipe.runner import DecodeOptions, Session

    write_latents(tmp_path / "lat.pt", (16, 21, 60, 104))
    session = Session()
    job = session.prepare(tmp_path / "lat.pt", tmp_path / "out.mp4", DecodeOptions(vae="random:wan2.1", device="cuda"),
                          EncodeOptions(preset="ultrafast"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    session.run(job)
    peak = torch.cuda.max_memory_allocated() - before
    buffer, working = decode_need(frame_shape=(480, 832, 3), frames_per_chunk=4, frames_per_call=4, k=2,
                                  dtype=torch.bfloat16, width=96, latent_numel=16 * 21 * 60 * 104)
    print(f"peak {peak / 2**30:.2f} GiB, floor {(buffer + working) / 2**30:.2f} GiB")
    assert buffer + working < peak


@pytest.mark.parametrize("change, words", [
    ({"base_dim": "96"}, "base_dim must be a number (such as 96), got \"96\""),
    ({"dim_mult": {"a": 1}}, "dim_mult must be a list of numbers"),
    ({"dim_mult": [1, "2"]}, "dim_mult must be a list of numbers"),
    ({"temperal_downsample": "yes"}, "temperal_downsample must be a list"),
    ({"_class_name": 5}, "_class_name must be a class name such as \"AutoencoderKLWan\", got 5"),
    (None, "must hold a JSON object of the VAE's settings, got a list"),
])
def test_a_vae_config_with_wrong_types_names_the_key(tmp_path, latents_file, change, words):
    folder = vae_folder(tmp_path / "vae")
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps([settings] if change is None else {**settings, **change}))
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", "--vae", folder, "--device", "cpu")
    assert words in message


@pytest.mark.parametrize("name", ["a" * 246 + ".mp4", "f" * 250 + "/%05d.png"])
def test_a_250_character_output_name_works(tmp_path, latents_file, name):
    result = invoke("decode", latents_file, tmp_path / name, *TINY, "-q")
    assert result.exit_code == 0, result.output
    written = tmp_path / name.split("/")[0]
    assert written.exists() and {p.name for p in tmp_path.iterdir()} == {written.name, latents_file.name}


def test_an_output_name_longer_than_a_file_name_may_be_is_refused_before_any_work(tmp_path, latents_file,
                                                                                   no_vae_load):
    message = refused(tmp_path, "decode", latents_file, tmp_path / ("a" * 252 + ".mp4"), *TINY)
    assert "is 256 bytes, more than a file name may be (255); choose a shorter name" in message


def test_a_png_pattern_whose_folder_is_a_file_is_refused_before_any_work(tmp_path, latents_file, no_vae_load):
    (tmp_path / "notes.txt").write_text("a file")
    message = refused(tmp_path, "decode", latents_file, tmp_path / "notes.txt" / "%05d.png", *TINY)
    assert "notes.txt' is a file, not a folder" in message


@pytest.mark.parametrize("suffix", [".mp3", ".aac", ".flac", ".ac3"])
def test_random_bytes_under_an_audio_extension_are_refused_before_any_work(tmp_path, latents_file, no_vae_load,
                                                                           suffix):
    # ffmpeg names a raw stream after the extension and finds frame headers in random bytes: it lists an audio
    # stream, and only decoding shows there is none.
    noise = tmp_path / f"noise{suffix}"
    noise.write_bytes(random.Random(suffix).randbytes(1_000_000))
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", *TINY, "--audio", noise)
    assert "is not decodable audio" in message


@pytest.mark.parametrize("fps", ["1e-9", "0.01"])
def test_a_frame_rate_no_container_stores_is_refused_before_any_work(tmp_path, latents_file, no_vae_load, fps):
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mov", *TINY, "--fps", fps)
    assert "fps must be in 0.1..1000 (frame rates video containers store)" in message


def test_the_slowest_frame_rate_taken_is_stored_by_every_container(tmp_path, latents_file):
    for container in ("mp4", "mov", "mkv", "webm"):
        result = invoke("decode", latents_file, tmp_path / f"out.{container}", *TINY, "-q", "--fps", "0.1")
        assert result.exit_code == 0, result.output


class Payload:
    """Unpickling this would make a folder: loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_a_checkpoint_holding_code_is_refused_in_one_sentence(tmp_path, latents_file, suffix):
    marker = tmp_path / "ran"
    torch.save({"decoder.conv2.weight": torch.zeros(16, 16, 1, 1, 1), "hook": Payload(str(marker))},
               tmp_path / f"wan{suffix}")
    message = refused(tmp_path, "decode", latents_file, tmp_path / "out.mp4", "--vae", tmp_path / f"wan{suffix}",
                      "--device", "cpu")
    assert "refused to load" in message and "holds Python objects other than tensors" in message
    assert "could run code; use the checkpoint as .safetensors" in message
    assert "weights_only" not in message and message.count(". ") <= 1 and not marker.exists()


def test_the_file_size_limit_is_named_as_such(tmp_path):
    write_latents(tmp_path / "lat.pt", (16, 5, 20, 20))  # 160x160, 17 frames of noise: about 1 MB of FFV1
    limit = 100_000
    run = subprocess.run([sys.executable, "-m", "vaepipe", "decode", str(tmp_path / "lat.pt"), str(tmp_path / "o.mkv"),
                          *TINY, "--codec", "ffv1", "-q"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    message = " ".join(run.stderr.split())
    assert "the file-size limit (0.0954 MiB) was reached while writing" in message and "ulimit -f" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.pt"]


# -- files that are not regular files ---------------------------------------------------------------------------
@pytest.fixture
def not_a_file(tmp_path):
    """Make `name` a FIFO, a link to /dev/zero or a folder; fail the test (rather than hang it) if anything blocks
    reading it for more than a minute."""
    def make(name: str, kind: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "device":
            path.symlink_to("/dev/zero")
        else:
            path.mkdir()
        return path

    def hung(*_):
        raise AssertionError("vaepipe blocked reading a file that is not a regular file")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield make
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


WORDS = {"fifo": "is a FIFO (named pipe), not a regular file", "device": "is a device, not a regular file",
         "folder": "is a folder"}


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
@pytest.mark.parametrize("what", ["config", "manifest", "latents", "batch latents", "audio", "vae config",
                                  "vae weights", "vae file"])
def test_every_file_read_must_be_a_regular_file(tmp_path, latents_file, not_a_file, what, kind):
    if (what, kind) == ("vae file", "folder"):
        pytest.skip("a folder is what --vae takes for a diffusers VAE")
    if what == "config":
        args = ["batch", not_a_file("jobs.toml", kind)]
    elif what in ("manifest", "batch latents"):
        config = batch_folder(tmp_path, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\n'
                              '[[jobs]]\nlatents = "lat/b.pt"\noutput = "out/b.mp4"\n' if what == "batch latents"
                              else '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\n')
        if what == "batch latents":
            not_a_file("lat/b.pt", kind)
        args = ["batch", config] + (["--manifest", not_a_file("m.jsonl", kind)] if what == "manifest" else [])
    else:
        latents = not_a_file("z.pt", kind) if what == "latents" else latents_file
        args = ["decode", latents, tmp_path / "out.mp4", *TINY]
        if what == "audio":
            args += ["--audio", not_a_file("a.wav", kind)]
        elif what.startswith("vae "):
            folder = vae_folder(tmp_path / "vae")
            name = {"vae config": "config.json", "vae weights": "diffusion_pytorch_model.safetensors"}.get(what)
            if name:
                (folder / name).unlink()
                not_a_file(f"vae/{name}", kind)
            args[4] = str(folder if name else not_a_file("wan.safetensors", kind))
    message = refused(tmp_path, *args)
    assert WORDS[kind] in message and "does not exist" not in message, message
