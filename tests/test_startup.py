"""Start-up: what a command imports before it answers, the help text at 80 columns, the "loading…" line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vaepipe import families
from vaepipe.cli import app
from vaepipe.names import PRESET_STEMS

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def modules_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `code` (which may exit)."""
    script = (f"import atexit, sys\n"
              f"atexit.register(lambda: sys.__stdout__.write('MODULES ' + ' '.join(sys.modules) + '\\n'))\n{code}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout
    line = next(line for line in out.splitlines() if line.startswith("MODULES "))
    return {name.split(".")[0] for name in line.split()[1:]}


def cli(*args: str) -> str:
    return f"import sys; sys.argv = ['vaepipe', *{list(args)!r}]\nfrom vaepipe.cli import main\nmain()"


@pytest.mark.parametrize("code", ["import vaepipe.cli", cli("--help"), cli("decode", "--help"),
                                  cli("decode", "--crf", "x", "a.pt", "b.mp4"), cli("decode"), cli("bench", "--nope")],
                         ids=["import", "help", "decode-help", "bad-value", "missing-argument", "unknown-option"])
def test_help_and_argument_errors_import_neither_torch_nor_diffusers(code):
    loaded = modules_after(code)
    assert "typer" in loaded  # (the check sees what was imported)
    assert not loaded & {"torch", "diffusers", "numpy", "transformers"}


def test_make_latents_and_info_import_no_diffusers(tmp_path):
    assert "diffusers" not in modules_after(cli("make-latents", str(tmp_path / "l.pt"), "--size", "16x16x5"))
    assert (tmp_path / "l.pt").is_file()
    assert "diffusers" not in modules_after(cli("info", "--json"))


def test_the_light_preset_table_names_every_family():
    stems = [name.removeprefix("random:") for name in families.PRESETS if not name.endswith("-tiny")]
    assert list(PRESET_STEMS) == stems


def help_text(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [[], ["decode"], ["batch"], ["make-latents"], ["info"], ["bench"]],
                         ids=lambda c: c[0] if c else "vaepipe")
def test_help_reads_well_at_80_columns(command):
    text = help_text(*command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert not re.search(r"<(bool|str|int|float|path)>", text)  # values are named after their option
    assert "..." not in text.replace("[ARGS]...", "") and "…\n" not in text  # nothing cut short
    assert not re.search(r"\w-\n", text)  # no word broken at its hyphen (--no-cut-audio stays whole)


def test_decode_help_names_its_arguments_and_every_preset_family():
    text = help_text("decode")
    assert re.search(r"Usage: .*decode \[OPTIONS\] LATENTS OUTPUT$", text.splitlines()[0])
    assert "\n  LATENTS " in text and "\n  OUTPUT " in text
    flat = " ".join(text.split())
    for stem in PRESET_STEMS:
        assert re.search(rf"[ ,]{re.escape(stem)}[,.]", flat), stem


def test_a_loading_line_comes_first_on_stderr_and_never_in_json_or_quiet_output(tmp_path, latents_file):
    args = ["decode", str(latents_file), str(tmp_path / "o.mp4"), "--vae", "random:wan2.1-tiny", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].startswith("loading")
    json.loads(result.stdout)  # stdout holds the JSON alone
    quiet = runner.invoke(app, [*args[:2], str(tmp_path / "q.mp4"), *args[3:], "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
