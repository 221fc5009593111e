"""Soundtracks and tags: what ffmpeg reads back from the file, through the CLI, batch configs and the API."""

import json
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vaepipe
from vaepipe.cli import app
from vaepipe.encode import ffmpeg_exe

from conftest import audio_track, make_audio, read_metadata, read_tags, read_video, tiny_vae, toml_string, write_latents

runner = CliRunner()
FPS = 12.0
SECONDS = 9 / FPS  # the latents_file fixture decodes to 9 frames at 12 fps
# Stream copy cuts at a packet boundary: AAC packets hold 1024 samples, Opus 20 ms, MP3 1152.
PACKET_S = 1152 / 44100


def decode(latents, output, *extra):
    return runner.invoke(app, ["decode", str(latents), str(output), "--vae", "random:wan2.1-tiny", "--device", "cpu",
                               "-q", *map(str, extra)])


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sounds")
    return {
        "wav": make_audio(folder / "a.wav", 3),
        "m4a": make_audio(folder / "a.m4a", 3, "-c:a", "aac"),
        "opus": make_audio(folder / "a.opus", 3, "-c:a", "libopus"),
        "mp3": make_audio(folder / "a.mp3", 3, "-c:a", "libmp3lame"),
        "short": make_audio(folder / "short.wav", 0.25),
    }


@pytest.mark.parametrize("sound, container, codec, copied", [
    ("m4a", "mp4", "aac", True), ("wav", "mp4", "aac", False), ("mp3", "mp4", "mp3", True),
    ("opus", "webm", "opus", True), ("wav", "webm", "opus", False), ("m4a", "webm", "opus", False),
    ("wav", "mkv", "pcm_s16le", True), ("wav", "mov", "pcm_s16le", True), ("opus", "mov", "aac", False),
])
def test_audio_is_copied_where_the_container_takes_it_else_encoded_and_cut_to_the_video(
        tmp_path, latents_file, sounds, sound, container, codec, copied):
    out = tmp_path / f"out.{container}"
    result = decode(latents_file, out, "--audio", sounds[sound])
    assert result.exit_code == 0, result.output
    got_codec, seconds = audio_track(out)
    assert got_codec == codec
    # Encoded: cut to the sample; copied: at the first packet boundary at or past the video's end.
    assert SECONDS <= seconds <= SECONDS + (PACKET_S if copied else 1e-3) + 1e-6, seconds
    assert read_video(out).shape[0] == 9
    if copied:  # the same packets: the sound decodes to the input's first samples exactly
        assert _samples(out)[:4800].tobytes() == _samples(sounds[sound])[:4800].tobytes()


def _samples(path) -> np.ndarray:
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16)


def test_no_cut_audio_keeps_the_longer_soundtrack(tmp_path, latents_file, sounds):
    result = decode(latents_file, tmp_path / "out.mp4", "--audio", sounds["wav"], "--no-cut-audio")
    assert result.exit_code == 0, result.output
    assert audio_track(tmp_path / "out.mp4")[1] == pytest.approx(3.0, abs=1e-3)
    assert read_video(tmp_path / "out.mp4").shape[0] == 9


def test_a_shorter_soundtrack_leaves_the_video_whole(tmp_path, latents_file, sounds):
    result = decode(latents_file, tmp_path / "out.mp4", "--audio", sounds["short"])
    assert result.exit_code == 0, result.output
    assert audio_track(tmp_path / "out.mp4")[1] == pytest.approx(0.25, abs=1e-3)
    assert read_video(tmp_path / "out.mp4").shape[0] == 9


def test_the_soundtrack_does_not_touch_the_frames(tmp_path, latents_file, sounds):
    lossless = ["--codec", "ffv1", "--pix-fmt", "rgb24"]
    assert decode(latents_file, tmp_path / "a.mkv", *lossless).exit_code == 0
    assert decode(latents_file, tmp_path / "b.mkv", *lossless, "--audio", sounds["m4a"]).exit_code == 0
    assert np.array_equal(read_video(tmp_path / "a.mkv"), read_video(tmp_path / "b.mkv"))


def _refused(tmp_path, latents_file, *extra, output="out.mp4"):
    result = decode(latents_file, tmp_path / output, *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".part", ".png")]
    return " ".join(result.output.split())


def test_missing_unreadable_or_silent_audio_is_bad_input(tmp_path, latents_file):
    assert "audio file" in _refused(tmp_path, latents_file, "--audio", tmp_path / "none.wav")
    (tmp_path / "noise.wav").write_bytes(b"RIFF but not really" * 50)
    assert "could not read audio" in _refused(tmp_path, latents_file, "--audio", tmp_path / "noise.wav")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=d=1:s=32x32", str(tmp_path / "v.mkv")],
                   check=True)
    assert "holds no audio stream" in _refused(tmp_path, latents_file, "--audio", tmp_path / "v.mkv")
    assert "is a folder, not a regular file" in _refused(tmp_path, latents_file, "--audio", tmp_path)


def test_a_png_sequence_takes_no_soundtrack(tmp_path, latents_file, sounds):
    message = _refused(tmp_path, latents_file, "--audio", sounds["wav"], output="frames/%05d.png")
    assert "PNG sequence cannot carry a soundtrack" in message


# -- tags ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["mp4", "mov", "mkv", "webm"])
def test_the_prompt_is_the_title_and_what_made_it_the_json_comment(tmp_path, container):
    prompt = "a fox; on = the #moon\\ at 5\nsecond line"
    torch.save({"latents": torch.randn(16, 2, 3, 3), "fps": 12, "prompt": prompt, "seed": 42,
                "model": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "steps": 30}, tmp_path / "lat.pt")
    out = tmp_path / f"out.{container}"
    result = decode(tmp_path / "lat.pt", out, "--metadata", "artist=me", "--metadata", "seed=7")
    assert result.exit_code == 0, result.output
    tags = read_tags(out)
    assert tags["title"] == prompt and tags["artist"] == "me"
    assert json.loads(tags["comment"]) == {"prompt": prompt, "seed": "7", "model": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                                           "steps": 30}
    assert "fps" not in tags  # the stream's rate already says it


def test_safetensors_metadata_is_read_like_pt_keys(tmp_path):
    from safetensors.torch import save_file

    save_file({"latents": torch.randn(16, 2, 3, 3)}, str(tmp_path / "lat.safetensors"),
              metadata={"fps": "12", "prompt": "a cat", "seed": "3", "format": "pt"})
    assert decode(tmp_path / "lat.safetensors", tmp_path / "out.mp4").exit_code == 0
    tags = read_tags(tmp_path / "out.mp4")
    assert tags["title"] == "a cat" and json.loads(tags["comment"]) == {"prompt": "a cat", "seed": "3"}


def test_no_metadata_writes_no_tags_and_plain_latents_write_none(tmp_path, latents_file):
    torch.save({"latents": torch.randn(16, 2, 3, 3), "prompt": "a cat"}, tmp_path / "tagged.pt")
    assert decode(tmp_path / "tagged.pt", tmp_path / "none.mp4", "--no-metadata").exit_code == 0
    assert decode(latents_file, tmp_path / "plain.mp4").exit_code == 0
    for name in ("none.mp4", "plain.mp4"):
        tags = read_tags(tmp_path / name)
        assert "title" not in tags and "comment" not in tags


def test_a_batch_saved_with_one_prompt_per_sample_tags_each_video_with_its_own(tmp_path):
    torch.save({"latents": torch.randn(2, 16, 2, 3, 3), "prompt": ["a cat", "a dog"], "seed": 1},
               tmp_path / "lat.pt")
    assert decode(tmp_path / "lat.pt", tmp_path / "out.mp4").exit_code == 0
    assert [read_tags(tmp_path / f"out_{b}.mp4")["title"] for b in range(2)] == ["a cat", "a dog"]


def test_a_workflow_larger_than_a_command_line_argument_is_written_whole(tmp_path):
    workflow = {"nodes": [{"id": i, "widgets_values": ["x" * 100]} for i in range(2000)]}  # ~250 kB of JSON
    vaepipe.export_video(torch.randn(16, 2, 3, 3), tmp_path / "out.mkv", vae=tiny_vae(),
                         metadata={"workflow": json.dumps(workflow)})
    assert json.loads(json.loads(read_tags(tmp_path / "out.mkv")["comment"])["workflow"]) == workflow
    assert [p.name for p in tmp_path.iterdir()] == ["out.mkv"]  # the tags file went with the temporary output


@pytest.mark.parametrize("extra, words", [
    (["--metadata", "seed"], "--metadata takes KEY=VALUE"),
    (["--metadata", "a key=1"], "is not a tag name"),
    (["--metadata", "title=x", "--no-metadata"], "drop one"),
])
def test_bad_metadata_is_bad_input(tmp_path, latents_file, extra, words):
    assert words in _refused(tmp_path, latents_file, *extra)


def test_a_png_sequence_takes_no_tags(tmp_path, latents_file):
    message = _refused(tmp_path, latents_file, "--metadata", "title=x", output="frames/%05d.png")
    assert "no tags" in message


# Values that ffmpeg's metadata file syntax turned into other tags: a CR ended the line, a trailing backslash
# joined the next one, and this one would add a chapter and a new title.
FORGED = "x\r[CHAPTER]\nTIMEBASE=1/1\nSTART=0\nEND=1\ntitle=evil\\"
AWKWARD = "".join(map(chr, range(1, 32))) + "\x7f\x85\u2028 =;#\\ é \U0001f98a\\"


def _tag_by(route: str, tmp_path, out, title: str, artist: str):
    """Write `title` and `artist` into `out` through one of the four ways tags come in."""
    z = torch.randn(16, 2, 3, 3)
    if route == "latents":  # the prompt is the title; the artist is written as it is
        torch.save({"latents": z, "prompt": title, "artist": artist}, tmp_path / "lat.pt")
        return decode(tmp_path / "lat.pt", out)
    torch.save(z, tmp_path / "lat.pt")
    if route == "cli":
        return decode(tmp_path / "lat.pt", out, "--metadata", f"title={title}", "--metadata", f"artist={artist}")
    if route == "batch":
        (tmp_path / "jobs.toml").write_text(
            f'[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\n[[jobs]]\nlatents = "lat.pt"\n'
            f'output = "{out.name}"\nmetadata = {{ title = {toml_string(title)}, artist = {toml_string(artist)} }}\n')
        return runner.invoke(app, ["batch", str(tmp_path / "jobs.toml"), "-q"])
    try:
        vaepipe.export_video(z, out, vae=tiny_vae(), metadata={"title": title, "artist": artist})
    except vaepipe.BadInput as e:
        return type("Refused", (), {"exit_code": 2, "output": str(e)})
    return type("Done", (), {"exit_code": 0, "output": ""})


@pytest.mark.parametrize("route", ["cli", "latents", "batch", "api"])
@pytest.mark.parametrize("container", ["mp4", "mov", "mkv", "webm"])
def test_control_characters_and_a_trailing_backslash_are_stored_exactly(tmp_path, route, container):
    plain = tmp_path / f"plain.{container}"
    assert _tag_by(route, tmp_path, plain, "t", "a").exit_code == 0
    out = tmp_path / f"out.{container}"
    result = _tag_by(route, tmp_path, out, FORGED, AWKWARD)
    assert result.exit_code == 0, result.output
    tags, sections = read_metadata(out)
    assert (tags["title"], tags["artist"]) == (FORGED, AWKWARD)
    # No other tag, section or chapter appears or disappears: the same as short plain values give.
    want, want_sections = read_metadata(plain)
    assert tags.keys() == want.keys() and sections == want_sections


@pytest.mark.parametrize("route", ["cli", "batch", "api"])
@pytest.mark.parametrize("value, words", [("a\0b", "holds a NUL character"),
                                          ("a\ud800b", "not valid Unicode text"),
                                          ("x" * 70000, "more than a .mov tag holds"),
                                          ("y" * 40000 + "\\", "ends in a backslash")])
def test_a_tag_that_cannot_be_stored_exactly_is_refused(tmp_path, route, value, words):
    if route == "batch" and "\ud800" in value:
        pytest.skip("TOML holds no lone surrogates")
    result = _tag_by(route, tmp_path, tmp_path / "out.mov", value, "me")
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "metadata title" in " ".join(result.output.split())
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".mov", ".part")]


def test_a_stored_prompt_that_cannot_be_a_tag_is_left_out_with_a_warning(tmp_path):
    torch.save({"latents": torch.randn(16, 2, 3, 3), "prompt": "a\0b", "seed": 3}, tmp_path / "lat.pt")
    result = runner.invoke(app, ["decode", str(tmp_path / "lat.pt"), str(tmp_path / "out.mp4"), "--vae",
                                 "random:wan2.1-tiny", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert output.count("warning:") == 1 and "title tag (the stored prompt) holds a NUL character" in output
    tags = read_tags(tmp_path / "out.mp4")
    assert "title" not in tags and json.loads(tags["comment"]) == {"prompt": "a\0b", "seed": 3}  # JSON keeps it


# -- batch configs ---------------------------------------------------------------------------------------------


def test_batch_jobs_take_audio_and_tags_from_the_config(tmp_path, sounds):
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "theme.m4a").write_bytes(sounds["m4a"].read_bytes())
    write_latents(tmp_path / "a.pt", (16, 3, 3, 5), fps=12.0)
    write_latents(tmp_path / "b.pt", (16, 3, 3, 5), seed=1, fps=12.0)
    (tmp_path / "jobs.toml").write_text(
        '[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\naudio = "music/theme.m4a"\n'
        'metadata = { artist = "me", album = "tests" }\n'
        '[[jobs]]\nlatents = "a.pt"\noutput = "a.mp4"\nmetadata = { album = "jobs", seed = 5 }\n'
        '[[jobs]]\nlatents = "b.pt"\noutput = "b.mkv"\ncut_audio = false\nno_metadata = false\n')
    result = runner.invoke(app, ["batch", str(tmp_path / "jobs.toml"), "-q", "--metadata", "artist=you"])
    assert result.exit_code == 0, result.output
    tags = read_tags(tmp_path / "a.mp4")
    assert (tags["artist"], tags["album"], json.loads(tags["comment"])) == ("you", "jobs", {"seed": 5})
    assert audio_track(tmp_path / "a.mp4") == ("aac", pytest.approx(SECONDS, abs=PACKET_S))
    assert audio_track(tmp_path / "b.mkv")[1] == pytest.approx(3.0, abs=PACKET_S)


def test_batch_config_problems_with_audio_and_tags_are_listed(tmp_path):
    write_latents(tmp_path / "a.pt", (16, 2, 3, 3))
    (tmp_path / "jobs.toml").write_text(
        '[defaults]\nvae = "random:wan2.1-tiny"\nmetadata = "title=x"\n'
        '[[jobs]]\nlatents = "a.pt"\noutput = "a.mp4"\naudio = "missing.wav"\n')
    result = runner.invoke(app, ["batch", str(tmp_path / "jobs.toml")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "defaults.metadata must be a table" in message
    assert "jobs[0].audio" in message and "missing.wav' does not exist" in message
    assert not (tmp_path / "a.mp4").exists()
