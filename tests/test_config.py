"""Batch configs: every problem listed at once with its TOML path, precedence, glob expansion, relative paths."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vaepipe.cli import app
from vaepipe.config import OPTION_KEYS, ConfigError, load_config
from vaepipe.encode import EncodeOptions
from vaepipe.errors import BadInput
from vaepipe.runner import DecodeOptions

from conftest import write_latents


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "lat").mkdir()
    for name in ("a", "b", "c"):
        write_latents(tmp_path / "lat" / f"{name}.pt", (16, 3, 3, 5))
    (tmp_path / "lat" / "a.bin").write_bytes(b"latents in an unknown format")
    return tmp_path


def config(folder: Path, text: str) -> Path:
    path = folder / "batch.toml"
    path.write_text(text)
    return path


def problems(path: Path, overrides: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_option_tables_are_exactly_the_option_dataclass_fields():
    assert set(OPTION_KEYS) == {f.name for f in fields(DecodeOptions)} | {f.name for f in fields(EncodeOptions)}


def test_every_problem_is_listed_at_once_with_its_toml_path(folder):
    path = config(folder, """
[defaults]
dtype = "fp8"
crff = 3
latents = "x.pt"

[[jobs]]
latents = "lat/a.pt"
output = "out/a.mp4"
crf = 60

[[jobs]]
latents = "lat/missing.pt"
output = "out/b.mp4"
chunk = 0
preset = "glacial"

[[jobs]]
inputs = "lat/*.pt"
output_dir = "out/prores"
codec = "prores"

[[jobs]]
latents = "lat/a.pt"
output = "out/x.avi"

[[jobs]]
latents = "lat/b.pt"
output = "out/y.webm"
pix_fmt = "yuv444p10le"
fps = "fast"
sync = 1
""")
    assert problems(path, {"buffers": 9}) == [
        "--buffers must be in 2..8, got 9",
        "defaults.crff is not an option: did you mean crf?",
        "defaults.latents belongs in a [[jobs]] entry, not in [defaults]",
        "defaults.dtype must be one of bf16, fp16, fp32, got 'fp8'",
        "jobs[0].crf must be in 0..51 for h264, got 60",
        "jobs[1].chunk must be in 1..64, got 0",
        "jobs[1].preset must be one of ultrafast, superfast, veryfast, faster, fast, medium, slow, slower, veryslow,"
        " got 'glacial'",
        f"jobs[1].latents '{folder}/lat/missing.pt' does not exist",
        "jobs[2]: codec prores cannot be written to a .mp4 file: use one of .mov, .mkv or another --codec",
        f"jobs[3]: cannot tell the container from '{folder}/out/x.avi': use a name ending in .mp4, .mkv, .mov or"
        " .webm, or a PNG sequence pattern such as frames/%05d.png",
        "jobs[4].fps must be a number, got 'fast'",
        "jobs[4].sync must be true or false, got 1",
    ]


@pytest.mark.parametrize("text, expected", [
    ('title = "x"\n[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"',
     "title is not a section of a batch config: use [defaults] and [[jobs]]"),
    ('defaults = 3\n[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"', "defaults must be a table: [defaults]"),
    ('[defaults]\nvae = "random:wan2.1-tiny"', "no jobs: add [[jobs]] entries"),
    ('jobs = [1, 2]', "jobs must be an array of tables"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\noutptu = "b.mp4"',
     "jobs[0].outptu is not a job key: did you mean output?"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\ncrf = "18"', "jobs[0].crf must be an integer, got '18'"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\ncrf = true', "jobs[0].crf must be an integer, got True"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\nvae = 2', "jobs[0].vae must be a string, got 2"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\ndevice = "tpu"', "jobs[0].device must be cpu, cuda or"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\ncodec = "mpeg2"', "jobs[0].codec must be one of h264"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\npix_fmt = "nv12"', "jobs[0].pix_fmt must be one of"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\nfps = 0', "jobs[0].fps must be in 0.1..1000"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\nbuffers = 1', "jobs[0].buffers must be in 2..8, got 1"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\ncrf = 64',
     "jobs[0].crf must be in 0..51 for h264, got 64"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.webm"\ncrf = -1', "jobs[0].crf must be in 0..63 for vp9, got -1"),
    ('[defaults]\ncrf = 55\n[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"',
     "jobs[0].crf must be in 0..51 for h264, got 55 (set by defaults.crf)"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.webm"\ncodec = "h264"',
     "jobs[0]: codec h264 cannot be written to a .webm file"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\npix_fmt = "rgb24"',
     "jobs[0]: codec h264 does not take pix_fmt rgb24"),
    ('[[jobs]]\nlatents = "lat/a.pt"', "jobs[0] has no output: give latents and output, or inputs and output_dir"),
    ('[[jobs]]\noutput = "a.mp4"', "jobs[0] has no latents"),
    ('[[jobs]]\nlatents = ""\noutput = "a.mp4"', "jobs[0].latents must be a non-empty string, got ''"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\ninputs = "lat/*.pt"\noutput_dir = "o"',
     "jobs[0] mixes latents/output with inputs/output_dir"),
    ('[[jobs]]\ninputs = "lat/*.pt"', "jobs[0] has inputs but no output_dir"),
    ('[[jobs]]\noutput_dir = "o"', "jobs[0] has output_dir but no inputs"),
    ('[[jobs]]\ninputs = "lat/*.pt"\noutput_dir = "o"\nsuffix = "mkv"', "jobs[0].suffix must be the end of"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"\nsuffix = ".mkv"', "jobs[0].suffix goes with inputs"),
    ('[[jobs]]\ninputs = "nothing/*.pt"\noutput_dir = "o"', "jobs[0].inputs 'nothing/*.pt' matches no files"),
    ('[[jobs]]\nlatents = "lat/a.bin"\noutput = "a.mp4"', "jobs[0].latents"),
    ('[[jobs]]\nlatents = "lat/a.pt"\noutput = "o/a.mp4"\n[[jobs]]\ninputs = "lat/*.pt"\noutput_dir = "o"',
     "jobs[1] (a.pt): output"),
])
def test_each_problem_is_named_by_its_toml_path(folder, text, expected):
    found = problems(config(folder, text))
    assert any(p.startswith(expected) for p in found), found


def test_an_existing_file_of_an_unknown_format_is_named_as_such(folder):
    (found,) = problems(config(folder, '[[jobs]]\nlatents = "lat/a.bin"\noutput = "a.mp4"'))
    assert found.startswith("jobs[0].latents") and "is not a latents file" in found


def test_command_line_values_are_checked_and_named_as_options(folder):
    path = config(folder, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"')
    assert problems(path, {"dtype": "fp64", "pix_fmt": "nv12"})[:2] == [
        "--dtype must be one of bf16, fp16, fp32, got 'fp64'", "--pix-fmt must be one of yuv420p, yuv420p10le,"
        " yuv444p, yuv422p10le, yuv444p10le, rgb24, got 'nv12'"]


def test_bad_toml_and_missing_file_are_bad_input(folder):
    with pytest.raises(BadInput, match="not valid TOML"):
        load_config(config(folder, "[[jobs]\n"))
    with pytest.raises(BadInput, match="does not exist"):
        load_config(folder / "nope.toml")


def test_invalid_config_exits_2_listing_every_problem_and_writes_nothing(folder):
    path = config(folder, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "out/a.mp4"\ncrf = 99\n'
                          '[[jobs]]\nlatents = "lat/b.pt"\noutput = "out/b.mp4"\nchunk = 0\n')
    before = sorted(p.name for p in folder.rglob("*"))
    result = CliRunner().invoke(app, ["batch", str(path), "--vae", "random:wan2.1-tiny"])
    assert result.exit_code == 2
    assert "2 problems" in result.output and "jobs[0].crf" in result.output and "jobs[1].chunk" in result.output
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_precedence_command_line_over_job_over_defaults_over_built_in(folder):
    path = config(folder, """
[defaults]
crf = 20
preset = "fast"
chunk = 2
[[jobs]]
latents = "lat/a.pt"
output = "a.mp4"
crf = 16
chunk = 3
[[jobs]]
latents = "lat/b.pt"
output = "b.mp4"
""")
    a, b = load_config(path, {"chunk": 5}).jobs
    assert (a.encode.crf, a.encode.preset, a.decode.chunk, a.encode.pix_fmt, a.decode.buffers) == (
        16, "fast", 5, None, 2)  # job, defaults, command line, built-in, built-in
    assert (b.encode.crf, b.encode.preset, b.decode.chunk) == (20, "fast", 5)
    a, b = load_config(path).jobs
    assert (a.decode.chunk, b.decode.chunk) == (3, 2)


def test_inputs_glob_gives_one_job_per_file_named_after_the_input(folder):
    path = config(folder, """
[[jobs]]
latents = "lat/a.pt"
output = "first.mp4"
[[jobs]]
inputs = "lat/*.pt"
output_dir = "videos"
suffix = ".mkv"
codec = "ffv1"
[[jobs]]
inputs = "lat/[bc].pt"
output_dir = "more"
""")
    jobs = load_config(path).jobs
    assert [(j.index, j.name, j.latents.name, str(j.output.relative_to(folder))) for j in jobs] == [
        (0, "jobs[0]", "a.pt", "first.mp4"),
        (1, "jobs[1] (a.pt)", "a.pt", "videos/a.mkv"),
        (2, "jobs[1] (b.pt)", "b.pt", "videos/b.mkv"),
        (3, "jobs[1] (c.pt)", "c.pt", "videos/c.mkv"),
        (4, "jobs[2] (b.pt)", "b.pt", "more/b.mp4"),
        (5, "jobs[2] (c.pt)", "c.pt", "more/c.mp4"),
    ]
    assert {j.encode.codec for j in jobs[1:4]} == {"ffv1"} and jobs[4].encode.codec is None


def test_relative_paths_are_relative_to_the_config_file_not_the_working_directory(folder, tmp_path_factory,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    path = config(folder, '[[jobs]]\nlatents = "lat/a.pt"\noutput = "../out/a.mp4"\n'
                          f'[[jobs]]\nlatents = "{folder}/lat/b.pt"\noutput = "b.mp4"\n')
    a, b = load_config(path, allow_outside=True).jobs
    assert a.latents == folder / "lat" / "a.pt" and a.output == folder.parent / "out" / "a.mp4"
    assert b.latents == folder / "lat" / "b.pt" and b.output == folder / "b.mp4"
    monkeypatch.chdir(folder.parent)
    a, _ = load_config(Path(folder.name) / "batch.toml", allow_outside=True).jobs
    assert a.latents == folder / "lat" / "a.pt"


def test_an_unknown_preset_is_a_config_error_not_a_failed_job(folder):
    text = '[defaults]\nvae = "random:wan9"\n[[jobs]]\nlatents = "lat/a.pt"\noutput = "a.mp4"'
    found = problems(config(folder, text))
    assert found == ["defaults.vae is invalid: unknown preset 'random:wan9': use random:NAME or random:NAME-tiny,"
                     " NAME one of wan2.1, wan2.2, hunyuanvideo, hunyuanvideo1.5, ltx, ltx2, cogvideox, mochi, kvae,"
                     " kandinsky6-sr"]


def test_a_symlink_out_of_the_configs_folder_is_outside_too(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (folder / "link").symlink_to(elsewhere, target_is_directory=True)
    path = config(folder, '[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\n'
                          '[[jobs]]\nlatents = "lat/a.pt"\noutput = "link/a.mp4"\n')
    result = CliRunner().invoke(app, ["batch", str(path)])
    assert result.exit_code == 2
    assert "jobs[0].output 'link/a.mp4' is outside the config's folder" in " ".join(result.output.split())
    assert not list(elsewhere.iterdir())


def test_outputs_stay_under_the_configs_folder_unless_allowed_outside(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = config(folder, f'[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\n'
                          f'[[jobs]]\nlatents = "lat/a.pt"\noutput = "{elsewhere}/a.mp4"\n'
                          f'[[jobs]]\nlatents = "lat/b.pt"\noutput = "out/../../b.mp4"\n'
                          f'[[jobs]]\ninputs = "lat/c.pt"\noutput_dir = "../videos"\n'
                          f'[[jobs]]\nlatents = "lat/c.pt"\noutput = "out/fine/../c.mp4"\n')
    result = CliRunner().invoke(app, ["batch", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "3 problems" in message and "--allow-outside" in message
    for job, value in (("jobs[0].output", f"{elsewhere}/a.mp4"), ("jobs[1].output", "out/../../b.mp4"),
                       ("jobs[2].output_dir", "../videos")):
        assert f"{job} '{value}' is outside the config's folder" in message
    assert not list(elsewhere.iterdir()) and not (folder.parent / "b.mp4").exists()
    result = CliRunner().invoke(app, ["batch", str(path), "--allow-outside", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
