"""Segment-parallel encoding: one output's frames cut into closed-GOP segments, each encoded by its own ffmpeg at the
same time, then joined into one file without re-encoding.

    frames   0 ........... 160 | 161 .......... 320          (321 frames, --codec av1 --preset veryslow, 16 cores)
    encode   seg-000.mp4         seg-001.mp4                each an Encoder (one ffmpeg), fed by its own thread
    join     ffmpeg -f concat (each segment's exact duration) -c copy -> joined.mp4 -> renamed to the destination

A segment's encoder starts from nothing, so its first frame is a keyframe and nothing in it refers to another
segment: the joined stream decodes like one encode, with one more keyframe per cut. Cuts are no closer than a
codec's `min_frames` (measured in docs/benchmarks.md so that the keyframes cost a few per cent of size at most), and
in Matroska/WebM only where a frame's time is a whole millisecond (the container's tick), so the joined file has
exactly the timestamps one encoder would have written. Which frames go where depends only on the frame count, the
options and the core count, never on timing: the same inputs give the same bytes.

Everything lives in one hidden folder beside the destination (`.out.mp4.vaepipe-PID-ID.part/`; a later run removes
it if this process died) and only the finished join is renamed into place. A failing or killed segment encoder,
an error in the lanes, Ctrl-C or SIGTERM kill every ffmpeg and remove the folder.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import queue
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from .encode import X264_PRESETS, EncodePlan, Encoder, _remove_stale_parts, _temp_home, ffmpeg_exe, mux_args
from .errors import VaepipeError
from .ffmpeg import file_size_limit
from .mux import Mux


@dataclass(frozen=True, slots=True)
class Policy:
    min_frames: int
    """The shortest segment: each cut adds a keyframe, which costs more the shorter the segments."""
    auto_from: str | None
    """The fastest preset (x264's names) at which `--encoders auto` splits this codec: where one encoder falls
    behind the decode lane; None: never."""


# Measured on natural content (docs/benchmarks.md, "Segment-parallel encoding"): the size cost of cutting 321
# frames at 720x1280 into segments of this length is +3.0 % for x265 (107 frames; +7 % at 81) and +0.1 % for
# SVT-AV1 (161 frames, where it puts a keyframe itself; +8.4 % at 107); x264 +1.6 % at 80. libvpx puts a keyframe
# every 128 frames itself. Intra-only codecs lose nothing at any cut.
# Where auto splits, timed on the H200 host (16 cores, 720x1280x321, the default engine decoding 49 fps): one x265
# encoder keeps up at preset medium (auto: 6.99 s against 6.91 s) and falls behind at slow (auto: 10.12 s against
# 12.24 s); one SVT-AV1 encoder keeps up at preset 6 and 5 (medium, slow: 129 and 104 fps alone). libvpx and
# slower SVT-AV1 presets were timed on the 2-core machine only (480x832x81 alone): x265 medium 2.16 s, slow 4.31 s;
# libvpx medium 3.60 s; SVT-AV1 preset 4 (slower) 2.40 s, preset 2 (veryslow) 6.18 s. Each splits from the preset
# where it is about as slow as x265 at slow or slower.
POLICIES = {
    "h264": Policy(min_frames=80, auto_from=None),
    "h265": Policy(min_frames=100, auto_from="slow"),
    "av1": Policy(min_frames=160, auto_from="veryslow"),
    "vp9": Policy(min_frames=128, auto_from="medium"),
    "prores": Policy(min_frames=16, auto_from=None),
    "ffv1": Policy(min_frames=16, auto_from=None),
}
AUTO_THREADS = 4
"""auto: at most one encoder per this many cores. Each segment's encoder keeps its own default threads (all the
cores): the segments start one after another as the frames come, and on the H200 host a fixed share of the cores
(x265 at medium, 3 encoders of 5 threads) left them idle while the first segment ran alone: 7.79 s against 6.94 s
for one encoder, where sharing all the cores gave 6.99 s."""
AUTO_MAX = 4
"""auto: at most this many encoders."""
QUEUE_BYTES = 1 << 30
"""Frames held for segment encoders that are behind; past this `write` waits (the lanes slow down as with one)."""


def segment_lengths(plan: EncodePlan, frames: int, cores: int | None = None) -> list[int]:
    """How many frames each segment gets, in order (one entry: no segments). `plan.encoders` is an upper bound:
    segments are never shorter than the codec's `min_frames`."""
    policy = POLICIES.get(plan.codec)
    if plan.encoders == 1 or policy is None or frames <= 0:
        return [frames]
    cores = cores or os.cpu_count() or 1
    if plan.encoders == "auto":
        if policy.auto_from is None or X264_PRESETS.index(plan.preset) < X264_PRESETS.index(policy.auto_from):
            return [frames]
        n = min(AUTO_MAX, cores // AUTO_THREADS)
    else:
        n = plan.encoders
    return split(frames, min(n, frames // policy.min_frames), timestamp_step(plan))


def split(frames: int, n: int, step: int = 1) -> list[int]:
    """`frames` in at most `n` segments as equal as cuts on multiples of `step` allow, the longer ones first (the
    last segment, which starts last, is the shortest: it finishes soonest after the last frame)."""
    units = frames // step
    n = min(n, units)
    if n <= 1:
        return [frames]
    q, r = divmod(units, n)
    lengths = [(q + (k < r)) * step for k in range(n)]
    lengths[-1] += frames - units * step
    return lengths


def timestamp_step(plan: EncodePlan) -> int:
    """Cuts fall on multiples of this many frames. Matroska/WebM store milliseconds: a segment that starts between
    two ticks would be shifted by the rounding, so cut only where a frame's time is a whole millisecond."""
    if plan.dest.suffix.lower() not in (".mkv", ".webm"):
        return 1  # MP4/MOV: the time scale follows the frame rate
    fps = _rate(plan.fps)
    return fps.numerator // math.gcd(fps.numerator, 1000 * fps.denominator)


def _rate(fps: float) -> Fraction:
    """The frame rate as ffmpeg reads `-framerate {fps:g}`."""
    return Fraction(f"{fps:g}").limit_denominator(1001000)


class SegmentedEncoder:
    """Like an Encoder (write, finish, abort, output_bytes), with one ffmpeg per segment. `write` hands frames to
    each segment's feeder thread and returns; a segment's encoder gets its end of input as soon as its last frame
    is in, so it finishes while later segments are still fed."""

    def __init__(self, plan: EncodePlan, lengths: list[int]):
        self.plan = plan
        self.frames = 0
        self.lengths = lengths
        self._starts = [sum(lengths[:k]) for k in range(len(lengths))]
        folder, name = _temp_home(plan.dest)
        self._dir = folder / f".{name}.vaepipe-{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
        try:
            _remove_stale_parts(plan.dest)
            self._dir.mkdir(parents=True)
        except OSError as e:
            raise VaepipeError(f"cannot write {plan.dest}: {e}") from None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._budget = threading.Condition()
        self._queued = 0
        self._segments: list[Encoder] = []
        self._queues: list[queue.Queue[torch.Tensor | None]] = []
        self._closed: list[bool] = []
        self._feeders: list[threading.Thread] = []
        try:
            for k in range(len(lengths)):
                # The soundtrack and the tags go in once, at the join.
                seg_plan = dataclasses.replace(plan, dest=self._dir / f"seg-{k:03d}{plan.dest.suffix}", encoders=1,
                                               mux=Mux())
                self._segments.append(Encoder(seg_plan))
                self._queues.append(queue.Queue())
                self._closed.append(False)
            for k in range(len(lengths)):
                feeder = threading.Thread(target=self._feed, args=(k,), name=f"vaepipe-segment-{k}", daemon=True)
                self._feeders.append(feeder)
                feeder.start()
        except BaseException:
            self.abort()
            raise

    def write(self, frames: torch.Tensor) -> None:
        """Frames: uint8 [F, H, W, 3] on the CPU; copied, so the caller may reuse the buffer at once."""
        n, first = frames.shape[0], self.frames
        offset = 0
        while offset < n:
            k = bisect.bisect_right(self._starts, first + offset) - 1
            end = self._starts[k] + self.lengths[k] if k + 1 < len(self.lengths) else first + n  # the last takes all
            piece = frames[offset : offset + min(n - offset, end - first - offset)].clone()
            self._reserve(piece.nbytes)
            for j in range(k):  # every earlier segment has all its frames: let its encoder finish now
                self._close(j)
            self._queues[k].put(piece)
            offset += piece.shape[0]
        self.frames += n

    def _reserve(self, nbytes: int) -> None:
        with self._budget:
            while self._queued and self._queued + nbytes > QUEUE_BYTES and self._error is None:
                self._budget.wait(timeout=0.1)
            self._raise_if_failed()
            self._queued += nbytes

    def _release(self, nbytes: int) -> None:
        with self._budget:
            self._queued -= nbytes
            self._budget.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _close(self, k: int) -> None:
        if not self._closed[k]:
            self._closed[k] = True
            self._queues[k].put(None)

    def _feed(self, k: int) -> None:
        segment, work = self._segments[k], self._queues[k]
        try:
            while (piece := work.get()) is not None:
                if not self._stop.is_set():
                    segment.write(piece)
                self._release(piece.nbytes)
            if not self._stop.is_set() and segment.frames:
                segment.finish()  # the segment's file complete inside our folder
        except BaseException as e:  # noqa: BLE001 - handed to the writer, which raises it
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            first = self._error is None and not self._stop.is_set()
            if first:
                self._error = error
        if first:
            self._stop.set()
            for segment in self._segments:  # unblocks every feeder stuck on a full pipe
                segment.abort()
        with self._budget:
            self._budget.notify_all()

    def finish(self) -> Path:
        """Wait for every segment, join them and move the file into place; on any failure clean up and raise."""
        try:
            for k in range(len(self._queues)):
                self._close(k)
            for feeder in self._feeders:
                feeder.join()
            self._raise_if_failed()
            for unused in (s for s in self._segments if not s.frames):  # fewer frames came than planned
                unused.abort()
            used = [s for s in self._segments if s.frames]
            if not used:
                raise VaepipeError(f"no frames were written for {self.plan.dest}")
            joined = self._dir / f"joined{self.plan.dest.suffix}"
            self._join(used, joined)
            try:
                os.replace(joined, self.plan.dest)
            except OSError as e:
                raise VaepipeError(f"cannot move the finished video to {self.plan.dest}: {e}") from None
            shutil.rmtree(self._dir, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        return self.plan.dest

    def _join(self, segments: list[Encoder], target: Path) -> None:
        fps = _rate(self.plan.fps)
        # Each segment's duration given exactly: the next one starts there, whatever the container's own rounding.
        listing = "".join(f"file '{s.plan.dest.name}'\nduration {float(s.frames / fps):.6f}\n" for s in segments)
        (self._dir / "segments.txt").write_text(listing)
        mux = self.plan.mux
        tags = mux.write_tags(self._dir / "tags.txt")
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "concat",
               "-i", str(self._dir / "segments.txt"), *mux.input_args(tags), *([] if mux.audio else ["-map", "0:v"]),
               "-c:v", "copy", *mux.output_args(tags), *mux_args(self.plan), "-y", str(target)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)  # as Encoder: Ctrl-C reaches vaepipe, which stops it
        try:
            _, err = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            limit = file_size_limit(proc.returncode, self.plan.dest)
            if limit:
                raise limit
            tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-20:])
            raise VaepipeError(f"ffmpeg failed joining {len(segments)} segments (exit code {proc.returncode})"
                               + (f":\n{tail}" if tail else ""))

    def abort(self) -> None:
        """Kill every ffmpeg, stop the feeders and remove the folder. Safe to call twice, from any thread."""
        with self._lock:
            self._stop.set()
        for segment in self._segments:
            segment.abort()
        for k in range(len(self._queues)):
            self._close(k)
        with self._budget:
            self._budget.notify_all()
        for feeder in self._feeders:
            if feeder is not threading.current_thread():
                feeder.join()
        shutil.rmtree(self._dir, ignore_errors=True)

    def output_bytes(self) -> int:
        return self.plan.dest.stat().st_size

    @property
    def encoders(self) -> int:
        return len(self.lengths)
