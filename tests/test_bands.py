"""Decoding in bands with halos (vaepipe/bands.py): the rows each band computes, and the banded stream against the
whole-frame one, on the CPU in fp32 for every family that bands, on odd heights and bands down to a row."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from vaepipe import bands
from vaepipe.cli import app
from vaepipe.decode import decode_stream, to_uint8_frames
from vaepipe.engine import Engine
from vaepipe.errors import BadInput
from vaepipe.families import FAMILIES, family_of

from conftest import read_video, tiny_vae, write_latents

BANDING = [f for f in FAMILIES if not f.cannot_band]


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


# The halo arithmetic: every output row of a band is computed from real rows only.

def _valid_rows(shape: bands.TailShape, height: int, s: bands.Slab) -> tuple[int, int]:
    """Simulate a slab forwards: the rows whose every input was a real row of the frame (or the frame's own zero
    border), given that each stage starts from exactly the rows `s.needs` says."""
    heights = shape.heights(height)
    for stage, ops in enumerate(shape.ops):
        lo, hi = s.needs[stage]
        valid, h = (lo, hi), heights[stage]
        for kind, n in ops:
            if kind == "conv":  # a row is right where all its inputs are; the frame's edge is its own zero padding
                valid = (valid[0] + (n if valid[0] > 0 else 0), valid[1] - (n if valid[1] < h else 0))
            else:
                valid, h, lo, hi = (valid[0] * n, valid[1] * n), h * n, lo * n, hi * n
        if stage + 1 < len(shape.ops):
            assert valid[0] <= s.needs[stage + 1][0] and s.needs[stage + 1][1] <= valid[1], (stage, valid, s)
    return valid


@pytest.mark.parametrize("seed", range(40))
def test_every_band_row_is_computed_from_real_rows_only(seed):
    rng = random.Random(seed)
    ops = tuple(tuple([("conv", rng.choice([0, 1, 1, 2]))] * rng.randint(0, 5)
                      + ([("up", 2), ("conv", 1)] if rng.random() < 0.7 else [])) for _ in range(rng.randint(1, 4)))
    shape = bands.TailShape(ops=ops, channels=(8,) * len(ops), frames=(1,) * len(ops), caches=(), head_channels=8)
    height = rng.randint(1, 13)
    out = shape.heights(height)[-1]
    for rows in bands.band_rows(out, rng.randint(1, out), rng.choice([1, out // height or 1])):
        s = bands.slab(shape, height, rows)
        valid = _valid_rows(shape, height, s)
        assert valid[0] <= rows[0] and rows[1] <= valid[1]


def test_bands_cover_the_frame_once_on_latent_row_edges():
    rows = bands.band_rows(56, 3, 8)
    assert rows[0][0] == 0 and rows[-1][1] == 56 and all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    assert all(a % 8 == 0 for a, _ in rows)
    assert bands.band_rows(56, 56, 8) == [(i, i + 1) for i in range(56)]  # bands of a row: edges off the grid
    with pytest.raises(BadInput, match="bands must be in 1..56"):
        bands.band_rows(56, 57, 8)


# The banded stream against the whole-frame one.

class _Recorded:
    """A tail that records every output it writes (float, as a video [1, 3, F, rows, W]), in the loop's order."""

    def __init__(self, tail, video):
        self._tail, self._video, self.outputs = tail, video, []

    def __getattr__(self, name):
        return getattr(self._tail, name)

    def write(self, out, frames):
        self.outputs.append(self._video(out).clone())
        self._tail.write(out, frames)


def _banded(vae, z, plan, *, engine: Engine | None = None):
    """(uint8 frames [F, H, W, 3], float video [1, 3, F, H, W]) of the banded stream, one window for the clip."""
    from vaepipe.engine import Piece, _Tail
    from vaepipe.families.wan import _DiffusersTail

    if engine:
        engine.decoder.setup(z.shape[3], z.shape[4], plan.chunk, tail=False)
        tail = _Recorded(_Tail(engine), lambda out: Piece(out, engine.final, engine.patch).video())
        x = vae.post_quant_conv(z)
    else:
        tail, x = _Recorded(_DiffusersTail(vae), lambda out: out), vae.post_quant_conv(z)
    width = z.shape[4] * vae.config.scale_factor_spatial
    frames = torch.cat([p.frames for p in bands.stream(tail, x, plan, width=width,
                                                         temporal=vae.config.scale_factor_temporal)])
    calls = len(tail.outputs) // plan.bands
    video = torch.cat([torch.cat(tail.outputs[c::calls], dim=3) for c in range(calls)], dim=2)
    return frames, video


def _whole(vae, z):
    video = torch.cat(list(decode_stream(vae, z)), dim=2)
    frames = torch.empty((video.shape[2], *video.shape[3:], 3), dtype=torch.uint8)
    to_uint8_frames(video, frames)
    return frames, video


def _clip(vae, z, chunks=(1,)):
    family = family_of(vae)
    return bands.Clip(shape=family.tail_shape(vae), height=z.shape[3], width=z.shape[4], latent_frames=z.shape[2],
                      itemsize=4, fixed=0, frame_bytes=1, chunks=chunks)


@pytest.mark.slow
@pytest.mark.parametrize("preset, height, counts", [
    ("random:wan2.1-tiny", 3, (2, 3, 24)),  # 24: bands of one row
    ("random:wan2.1-tiny", 5, (2, 3, 13)),  # 13: bands of 3 rows, edges off the latent grid
    ("random:wan2.2-tiny", 3, (2, 3, 8)),
])
def test_banded_diffusers_decoder_gives_the_whole_decodes_frames(preset, height, counts):
    vae = tiny_vae(preset)
    z = torch.randn(1, vae.config.z_dim, 2, height, 6, generator=torch.Generator().manual_seed(height))
    clip = _clip(vae, z)
    with torch.inference_mode():
        want_frames, want = _whole(vae, z)
        for count in counts:
            frames, video = _banded(vae, z, bands.plan(clip, bands=count))
            assert video.shape == want.shape
            assert (video - want).abs().max() <= 1e-5, count
            assert torch.equal(frames, want_frames), count


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["random:wan2.1-tiny", "random:wan2.2-tiny"])
def test_banded_engine_gives_the_unbanded_engines_frames(preset):
    vae = tiny_vae(preset)
    z = torch.randn(1, vae.config.z_dim, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    engine = Engine(vae, exact=False, chunk=2)  # calls of 1 and 2 latent frames
    clip = _clip(vae, z, chunks=(2,))
    with torch.inference_mode():
        pieces = list(engine.stream(z))
        want = torch.cat([p.video() for p in pieces], dim=2)
        for count in (2, clip.out_height // 4):
            _, video = _banded(vae, z, bands.plan(clip, bands=count), engine=engine)
            assert (video - want).abs().max() <= 1e-5, count


@pytest.mark.slow
@pytest.mark.parametrize("caches, window", [("device", 1), ("host", 2)])
def test_windows_keep_every_bands_caches_between_them(caches, window):
    vae = tiny_vae()
    z = torch.randn(1, 16, 4, 3, 6, generator=torch.Generator().manual_seed(3))
    family = family_of(vae)
    with torch.inference_mode():
        want, _ = _whole(vae, z)
        plan = bands.plan(_clip(vae, z), bands=3, caches=caches, window=window)
        got = torch.cat([p.frames for p in family.banded(vae, z, plan)])
    assert plan.window == window and plan.caches == caches
    assert torch.equal(got, want)


# Choosing the bands.

def test_fewest_bands_whose_modelled_peak_fits():
    vae = tiny_vae()
    clip = _clip(vae, torch.empty(1, 16, 5, 30, 40), chunks=(2, 1))
    needs = [clip.need(b, 1, clip.latent_frames, "device")[0] for b in (1, 2, 3)]
    assert needs[0] > needs[1] > needs[2]
    chosen = bands.choose(clip, needs[1] + 1)
    assert chosen.bands == 2 and chosen.need <= needs[1] + 1
    assert bands.choose(clip, needs[0] * 10).bands == 1
    with pytest.raises(BadInput, match="needs at least .* raise --max-vram"):
        bands.choose(clip, 1000)


# The command line.

def test_cli_bands_write_the_frames_of_the_whole_decode(tmp_path):
    write_latents(tmp_path / "l.pt", (1, 16, 2, 5, 6), seed=4)
    outs = {}
    for count in (1, 3):
        result = run_cli("decode", str(tmp_path / "l.pt"), str(tmp_path / f"o{count}.mkv"), "--vae",
                         "random:wan2.1-tiny", "--codec", "ffv1", "--bands", str(count), "--json")
        assert result.exit_code == 0, result.output
        outs[count] = json.loads(result.stdout)["outputs"][0]
    assert outs[1]["bands"] == 1 and outs[1]["band_plan"] is None
    assert outs[3]["bands"] == 3 and outs[3]["band_plan"]["caches"] == "device"
    assert (read_video(tmp_path / "o1.mkv") == read_video(tmp_path / "o3.mkv")).all()


def test_cli_max_vram_below_the_minimum_names_it_and_writes_nothing(tmp_path):
    write_latents(tmp_path / "l.pt", (1, 16, 3, 7, 10))
    result = run_cli("decode", str(tmp_path / "l.pt"), str(tmp_path / "o.mp4"), "--vae", "random:wan2.1-tiny",
                     "--max-vram", "1MB")
    assert result.exit_code == 2
    assert "needs at least" in result.output and "--max-vram" in result.output
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("args, words", [(["--max-vram", "six"], "must be a size such as 6GiB"),
                                         (["--bands", "99"], "bands must be in 1..56"),
                                         (["--band-caches", "disk"], "band_caches must be device or host")])
def test_cli_bad_band_options_exit_2(tmp_path, args, words):
    write_latents(tmp_path / "l.pt", (1, 16, 3, 7, 10))
    result = run_cli("decode", str(tmp_path / "l.pt"), str(tmp_path / "o.mp4"), "--vae", "random:wan2.1-tiny", *args)
    assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "o.mp4").exists()


def test_a_family_that_cannot_band_says_why(tmp_path):
    write_latents(tmp_path / "l.pt", (1, 16, 2, 4, 4))
    result = run_cli("decode", str(tmp_path / "l.pt"), str(tmp_path / "o.mp4"), "--vae", "random:cogvideox-tiny",
                     "--bands", "2")
    assert result.exit_code == 2 and "cannot decode in bands" in result.output and "GroupNorm" in result.output


@pytest.mark.slow
def test_frames_that_do_not_fit_are_banded_by_themselves(tmp_path, monkeypatch):
    from vaepipe import runner

    write_latents(tmp_path / "l.pt", (1, 16, 3, 7, 10), seed=2)
    assert run_cli("decode", str(tmp_path / "l.pt"), str(tmp_path / "whole.mkv"), "--vae", "random:wan2.1-tiny",
                   "--codec", "ffv1").exit_code == 0
    monkeypatch.setattr(runner, "device_available", lambda device: 15 << 19)  # 7.5 MiB "free": 6 MiB planned
    result = run_cli("decode", str(tmp_path / "l.pt"), str(tmp_path / "o.mkv"), "--vae", "random:wan2.1-tiny",
                     "--codec", "ffv1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["outputs"][0]
    assert summary["bands"] > 1 and "fits in 6.0 MiB free" in summary["band_plan"]["why"]
    assert f"decoding in {summary['bands']} bands" in " ".join(result.output.split())  # (wrapped at 80 columns)
    assert (read_video(tmp_path / "o.mkv") == read_video(tmp_path / "whole.mkv")).all()


def test_every_family_says_whether_it_bands():
    assert BANDING, "no family decodes in bands"
    for family in FAMILIES:
        assert family.cannot_band == "" or len(family.cannot_band) > 20, family.name


def test_bench_bands_tables_bands_beside_whole_frames_and_enable_tiling(tmp_path):
    result = run_cli("bench", "--bands", "1,2", "--vae", "random:wan2.1-tiny", "--shape", "48x80x9", "--runs", "1",
                     "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    rows = {r["decoder"]: r for r in json.loads((tmp_path / "bands.json").read_text())[0]["rows"]}
    assert {"engine", "engine 2 device", "engine 2 host", "diffusers 2", "enable_tiling"} <= rows.keys()
    assert rows["engine 2 device"]["uint8_equal"] == 1.0 and rows["diffusers 2"]["uint8_equal"] == 1.0
    assert "| enable_tiling |" in (tmp_path / "bands.md").read_text()


def test_api_exporter_decodes_in_bands_with_the_frames_of_whole_frames(tmp_path):
    import vaepipe

    vae = tiny_vae()
    z = torch.randn(1, 16, 2, 5, 6, generator=torch.Generator().manual_seed(8))
    with vaepipe.Exporter(vae=vae, bands=3) as banded, vaepipe.Exporter(vae=vae) as whole:
        got = banded.export(z, tmp_path / "banded.mkv", codec="ffv1")["outputs"][0]
        whole.export(z, tmp_path / "whole.mkv", codec="ffv1")
    assert got["bands"] == 3
    assert (read_video(tmp_path / "banded.mkv") == read_video(tmp_path / "whole.mkv")).all()
