"""Bands on a CUDA GPU with full-size Wan VAEs: the frames of the whole decode, and a decode that does not fit the
memory it is given banding itself."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vaepipe.cli import app

from conftest import read_video, write_latents

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _decode(tmp_path, name: str, *args: str) -> dict:
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "l.pt"), str(tmp_path / name), "--codec", "ffv1",
                                      "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["outputs"][0]


def _close(a, b) -> None:
    """Within bf16's own noise of whole frames, and no seam: on an H100 the slabs' convs round otherwise than the
    whole frame's (51-75 % of uint8 values equal, up to 5 levels, the same PSNR against an fp32 decode:
    docs/benchmarks.md), where a halo one row short or a band written at the wrong rows gives tens of levels."""
    diff = abs(a.astype(int) - b.astype(int))
    psnr = 10 * np.log10(255**2 / max(float((diff.astype(float) ** 2).mean()), 1e-12))
    assert diff.max() <= 8 and psnr >= 45, (diff.max(), psnr)


@pytest.mark.parametrize("preset, shape, bands", [("random:wan2.1", (1, 16, 3, 60, 104), 4),
                                                   ("random:wan2.2", (1, 48, 3, 44, 80), 3)])
def test_cuda_banded_engine_gives_the_frames_of_whole_frames(tmp_path, preset, shape, bands):
    write_latents(tmp_path / "l.pt", shape, seed=11)
    _decode(tmp_path, "whole.mkv", "--vae", preset)
    summary = _decode(tmp_path, "banded.mkv", "--vae", preset, "--bands", str(bands))
    assert summary["bands"] == bands and summary["decoder"]["name"] == "engine"
    _close(read_video(tmp_path / "banded.mkv"), read_video(tmp_path / "whole.mkv"))


def test_cuda_decode_that_does_not_fit_its_memory_cap_bands_itself(tmp_path):
    """Wan 2.2 at 704x1280 under a per-process cap below what whole frames need: the default decode bands itself."""
    write_latents(tmp_path / "l.pt", (1, 48, 4, 44, 80), seed=12)
    whole = _decode(tmp_path, "whole.mkv", "--vae", "random:wan2.2")
    assert whole["bands"] == 1
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.mem_get_info(device)[1]
    cap = whole["peak_gib"] * 2**30 * 0.6
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        banded = _decode(tmp_path, "banded.mkv", "--vae", "random:wan2.2")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert banded["bands"] > 1 and banded["peak_gib"] * 2**30 <= cap
    _close(read_video(tmp_path / "banded.mkv"), read_video(tmp_path / "whole.mkv"))
