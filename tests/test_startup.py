"""Start-up: what a command imports before it answers, the help text at 80 columns, the "loading…" line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
                                  cli("decode", "--crf", "x", "a.pt", "b.mp4"), cli("decode"), cli("bench", "--nope"),
                                  cli("decode", "a.pt", "b.mp4", "--dtype", "fp64"),
                                  cli("decode", "a.pt", "b.mp4", "--max-vram", "six"),
                                  cli("decode", "a.pt", "b.mp4", "--vae", "random:nope"),
                                  cli("batch", "no-such-config.toml")],
                         ids=["import", "help", "decode-help", "bad-value", "missing-argument", "unknown-option",
                              "bad-dtype", "bad-max-vram", "unknown-preset", "missing-config"])
def test_help_and_argument_errors_import_neither_torch_nor_diffusers(code):
    loaded = modules_after(code)
    assert "typer" in loaded  # (the check sees what was imported)
    assert not loaded & {"torch", "diffusers", "numpy", "transformers"}


def test_make_latents_and_info_import_no_diffusers(tmp_path):
    assert "diffusers" not in modules_after(cli("make-latents", str(tmp_path / "l.pt"), "--size", "16x16x5"))
    assert (tmp_path / "l.pt").is_file()
    assert "diffusers" not in modules_after(cli("info", "--json"))


def test_the_light_wan_geometry_is_the_built_models():
    from vaepipe.names import WAN_GEOMETRY

    for name, (z, scale, temporal) in WAN_GEOMETRY.items():
        family, config = families.PRESETS[name]
        with torch.device("meta"):
            model = family.build(config)
        assert (family.z_dim(model), family.spatial_factor(model), family.temporal_factor(model)) == (z, scale,
                                                                                                     temporal)
        assert family.num_frames(model, 3) == 1 + 2 * temporal


def test_the_light_preset_table_names_every_family():
    from vaepipe.options import PRESET_NAMES

    stems = [name.removeprefix("random:") for name in families.PRESETS if not name.endswith("-tiny")]
    assert list(PRESET_STEMS) == stems
    assert set(families.PRESETS) == PRESET_NAMES  # what DecodeOptions takes without importing torch


def help_text(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [[], ["decode"], ["batch"], ["make-latents"], ["info"], ["bench"], ["warmup"]],
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


# -- start-up parts -------------------------------------------------------------------------------------------------
def test_json_reports_start_up_as_parts_within_the_commands_time(tmp_path, latents_file):
    result = runner.invoke(app, ["decode", str(latents_file), str(tmp_path / "o.mp4"), "--vae", "random:wan2.1-tiny",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    parts = summary["startup"]
    assert set(parts) == {"imports_s", "vae_load_s", "first_call_extra_s", "total_s"}
    assert parts["vae_load_s"] == summary["load_s"]
    assert parts["imports_s"] > 0 and parts["imports_s"] + parts["vae_load_s"] <= parts["total_s"]
    assert parts["first_call_extra_s"] == pytest.approx(summary["outputs"][0]["first_call_extra_s"], abs=1e-3)
    assert parts["first_call_extra_s"] >= 0
    assert "start-up: imports" in runner.invoke(app, ["decode", str(latents_file), str(tmp_path / "t.mp4"), "--vae",
                                                      "random:wan2.1-tiny", "--device", "cpu"]).stderr


def test_first_call_extra_is_the_decode_time_beyond_the_steady_rate():
    from vaepipe.startup import first_call_extra_s

    chunks = [1, 4, 4, 4, 4]
    busy = [1.0, 0.9, 0.4, 0.44, 0.36]  # the first full chunk carries its shape's set-up; steady 0.1 s a frame
    spans = [("decode", i, 10.0 * i, 10.0 * i + b) for i, b in enumerate(busy)] + [("encode", 0, 0.0, 5.0)]
    assert first_call_extra_s(spans, chunks) == pytest.approx(sum(busy) - 0.1 * 17)
    assert first_call_extra_s(spans[:2], chunks[:2]) is None  # no steady chunk to compare with


# -- loading --------------------------------------------------------------------------------------------------------
def test_a_preset_is_built_on_its_target_device(monkeypatch):
    import torch

    from vaepipe.vae import load_vae

    seen = []
    init = torch.nn.init.kaiming_uniform_

    def recording(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        return init(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", recording)
    vae = load_vae("random:wan2.1-tiny", dtype=torch.bfloat16, device=torch.device("meta"))
    assert seen and set(seen) == {"meta"}  # initialised where it runs, never on the CPU first
    assert {p.device.type for p in vae.model.parameters()} == {"meta"} and vae.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
def test_a_preset_decodes_finite_frames_in_bf16(preset):
    import torch

    from vaepipe.vae import load_vae

    vae = load_vae(preset, dtype=torch.bfloat16, device=torch.device("cpu"))
    again = load_vae(preset, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(vae.model.state_dict().values(), again.model.state_dict().values(),
                                                 strict=True))  # seeded: the same weights in every process
    z = torch.randn(1, vae.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        video = vae.model.decode(z).sample
    assert video.shape[2] == 9 and bool(torch.isfinite(video).all()) and video.float().std() > 0.01


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_folder_loads_the_weights_diffusers_from_pretrained_loads(tmp_path, dtype):
    import torch
    from diffusers import AutoencoderKLWan

    from vaepipe.vae import DTYPES, load_vae

    load_vae("random:wan2.1-tiny", dtype=torch.float32, device=torch.device("cpu")).model.save_pretrained(tmp_path)
    got = load_vae(str(tmp_path), dtype=DTYPES[dtype], device=torch.device("cpu")).model.state_dict()
    want = AutoencoderKLWan.from_pretrained(tmp_path, torch_dtype=DTYPES[dtype]).state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_a_folder_loads_straight_to_the_device_without_diffusers_loader(tmp_path, monkeypatch):
    import torch
    from diffusers import AutoencoderKLWan

    from vaepipe.vae import load_vae

    saved = load_vae("random:wan2.1-tiny", dtype=torch.float32, device=torch.device("cpu")).model
    saved.save_pretrained(tmp_path)

    def no(*args, **kwargs):
        raise AssertionError("diffusers' from_pretrained ran: the weights went through it")

    monkeypatch.setattr(AutoencoderKLWan, "from_pretrained", no)
    got = load_vae(str(tmp_path), dtype=torch.bfloat16, device=torch.device("cpu")).model
    assert all(torch.equal(got.state_dict()[k], v.to(torch.bfloat16)) for k, v in saved.state_dict().items())
    assert not any(p.is_meta for p in got.parameters())


# -- bench's one-shot row -------------------------------------------------------------------------------------------
def test_bench_times_the_whole_command_from_fresh_processes(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--shape", "16x16x9",
                                 "--runs", "1", "--modes", "pipelined", "--content", "noise", "--no-decoders",
                                 "--one-shot", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "bench.json").read_text())["one_shot"]
    assert row["shape"] == "16x16x9" and row["runs"] == 2 and len(row["wall_s"]["each"]) == 2
    # The parent's wall holds the child's whole life: its start-up parts and more.
    for wall, parts in zip(row["wall_s"]["each"], row["startup_each"], strict=True):
        assert wall >= parts["total_s"] >= parts["imports_s"] + parts["vae_load_s"] > 0
    assert row["startup"]["imports_s"] > 0
    assert (out / "one-shot" / "16x16x9.mp4").stat().st_size > 0
    assert "One-shot" in (out / "bench.md").read_text() and "one-shot" in result.output


# -- the engine's set-up, remembered per machine ------------------------------------------------------------------
def test_warmup_records_a_choice_that_the_next_process_uses(tmp_path, monkeypatch):
    import torch

    from vaepipe.engine import Engine, tuning
    from vaepipe.vae import load_vae

    monkeypatch.setenv("VAEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEPIPE_CUDNN_TUNING", raising=False)
    result = runner.invoke(app, ["warmup", "--device", "cpu", "--vae", "random:wan2.1-tiny", "--size", "16x32",
                                 "--json"])
    assert result.exit_code == 0, result.output
    (warmed,) = json.loads(result.stdout)["warmed"]
    assert warmed["size"] == "16x32" and isinstance(warmed["cudnn_tuning"], bool)
    assert set(warmed["calls_s"]) == {"tuned", "heuristic"} and len(warmed["calls_s"]["tuned"]) == 4
    (key, record), = tuning.records().items()
    assert record["cudnn_tuning"] == warmed["cudnn_tuning"]

    vae = load_vae("random:wan2.1-tiny", dtype=torch.float32, device=torch.device("cpu"))
    engine = Engine(vae.model, exact=False)
    z = torch.randn(1, 16, 2, 2, 4)
    k = engine.chunk_for(2, 4)
    assert key == tuning.record_key(engine, 2, 4, k)  # the record is for this decode's shapes
    for stored in (False, True):  # what a later process decoding at that size reads
        tuning.remember(key, {**record, "cudnn_tuning": stored})
        with torch.inference_mode():
            list(engine.stream(z))
        assert engine.ctx.tune_cudnn is stored
    monkeypatch.setenv("VAEPIPE_CUDNN_TUNING", "0")
    with torch.inference_mode():
        list(engine.stream(z))
    assert engine.ctx.tune_cudnn is False


def test_warmup_without_a_gpu_has_nothing_to_do(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["warmup"])
    assert result.exit_code == 0 and "nothing to warm up" in result.output
