"""Random delays in every lane, many runs: the frames that come out never change."""

import pytest
import torch

from vaepipe.pipeline import Buffers, run_lanes

from conftest import tiny_vae
from lanes import MemorySink, decode_with_lanes, jitter, reference_frames

pytestmark = pytest.mark.slow  # many randomised runs of the lanes


@pytest.fixture(scope="module")
def case():
    vae = tiny_vae()
    z = torch.randn(1, 16, 6, 2, 3)
    return vae, z, reference_frames(vae, z)


@pytest.mark.parametrize("k, chunk", [(2, 1), (3, 1), (2, 2), (4, 3)])
def test_random_lane_delays_never_change_the_output(case, k, chunk):
    vae, z, want = case
    buffers = Buffers()  # reused across runs, as a batch reuses them
    for seed in range(25):
        got, stats = decode_with_lanes(vae, z, buffers=buffers, delays=jitter(seed, 0.004), k=k, chunk=chunk)
        assert torch.equal(got, want), f"seed {seed}"
        assert stats.frames == want.shape[0] and stats.chunks == -(-6 // chunk)


def test_sync_mode_gives_the_same_frames(case):
    vae, z, want = case
    got, stats = decode_with_lanes(vae, z, sync=True, delays=jitter(0, 0.002))
    assert torch.equal(got, want)
    assert {lane for lane, *_ in stats.spans} == {"decode", "copy", "encode"}


def test_every_chunk_has_one_span_per_lane_in_lane_order(case):
    vae, z, _ = case
    _, stats = decode_with_lanes(vae, z, delays=jitter(1, 0.002))
    for chunk in range(stats.chunks):
        spans = {lane: (start, end) for lane, c, start, end in stats.spans if c == chunk}
        assert set(spans) == {"decode", "copy", "encode"}
        assert spans["decode"][1] <= spans["copy"][0] + 1e-3 and spans["copy"][1] <= spans["encode"][0] + 1e-3


@pytest.mark.parametrize("fail_at", [0, 2])
def test_an_encoder_error_stops_the_lanes_and_is_raised(case, fail_at):
    vae, z, _ = case

    class Failing(MemorySink):
        def write(self, frames):
            if len(self.frames) == fail_at:
                raise OSError("disk full")
            super().write(frames)

    sink = Failing()
    with pytest.raises(OSError, match="disk full"), torch.inference_mode():
        from vaepipe.decode import decode_stream

        run_lanes(decode_stream(vae, z), sink, device=z.device, frame_shape=(16, 24, 3), frames_per_chunk=4,
                  chunk=1, buffers=Buffers())
    assert sink.aborted and len(sink.frames) == fail_at


@pytest.mark.parametrize("fail_at", [0, 3])
def test_a_copy_lane_error_stops_the_lanes_and_is_raised(case, fail_at, monkeypatch):
    import threading

    from vaepipe import pipeline

    vae, z, _ = case
    real, copies = torch.Tensor.copy_, []

    def copy_(self, src, *args, **kwargs):
        if threading.current_thread().name == "vaepipe-copy":
            copies.append(1)
            if len(copies) > fail_at:
                raise RuntimeError("copy failed")
        return real(self, src, *args, **kwargs)

    monkeypatch.setattr(pipeline.torch.Tensor, "copy_", copy_)
    with pytest.raises(RuntimeError, match="copy failed"):
        decode_with_lanes(vae, z, k=3)
    assert [t.name for t in threading.enumerate() if t.name.startswith("vaepipe-")] == []
