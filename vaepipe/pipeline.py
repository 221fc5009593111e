"""Moving bytes: three lanes that overlap decode, device-to-host copy and encode.

    main thread   compute stream   decode chunk N, convert to uint8 into vram[N % k]      record decoded[i]
                  copy stream      wait decoded[i], copy vram[i] -> pinned host[i]        record copied[i]
    worker thread                  wait copied[i], write host[i] to the encoder           release slot i

Barriers: CUDA events order the two streams; a CUDA event cannot mark host work, so the worker hands slot i back
through a semaphore that the main thread takes before it enqueues anything that overwrites vram[i] or host[i].
On the CPU the same lanes run as threads (copy thread instead of copy stream, threading events instead of CUDA
events), so every piece of this logic is tested without a GPU.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .decode import to_uint8_frames

LANES = ("decode", "copy", "encode")


class Sink(Protocol):
    def write(self, frames: torch.Tensor) -> None: ...
    def abort(self) -> None: ...


class Progress(Protocol):
    def advance(self, lane: str, frames: int) -> None: ...


@dataclass(kw_only=True, slots=True)
class LaneStats:
    frames: int = 0
    chunks: int = 0
    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LANES, 0.0))
    drain_s: float = 0.0
    """After the last frame went in: the encoder finishing (x264's lookahead, the mux) until the file is in place."""
    encoders: int = 1
    """Concurrent encoders (segments) the encode lane fed."""
    spans: list[tuple[str, int, float, float]] = field(default_factory=list)
    """(lane, chunk, start, end) in seconds since the lanes started: the timeline a trace shows."""
    chunk_frames: list[int] = field(default_factory=list)
    """Frames of each chunk, in order (with the decode spans: the first calls' extra time, startup.py)."""
    engine: dict | None = None
    """What the engine did (policy, latent frames per call, self-check time and fallbacks), when it decoded."""
    bands: dict | None = None
    """The bands the frames decoded in (bands.Plan.report), when more than whole frames."""
    peak: int | None = None
    """Peak device memory of the process so far (CUDA: torch.cuda.max_memory_allocated), when the file was done."""
    replaced: bool = False
    """The finished file took the place of one that was there (the rename is atomic; the old one is gone)."""

    @property
    def decode_utilization(self) -> float:
        return self.busy_s["decode"] / self.wall_s if self.wall_s else 0.0


class Buffers:
    """k frame buffers on the device and k pinned host buffers, allocated once and reused while the shape fits."""

    def __init__(self) -> None:
        self.vram: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []

    def setup(self, k: int, frames: int, frame_shape: tuple[int, int, int], device: torch.device) -> None:
        shape = (frames, *frame_shape)
        if len(self.vram) == k and tuple(self.vram[0].shape) == shape and self.vram[0].device == device:
            return
        self.vram = self.host = []  # drop the old ones first, so peak memory never holds both
        pin = device.type == "cuda"
        with torch.inference_mode(False):  # plain tensors: the lane threads run outside inference mode
            self.vram = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(k)]
            self.host = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(k)]


Jitter = Callable[[str], float]
"""Test hook: seconds of delay to inject into a lane ('decode', 'copy', 'encode') before its next step."""


def run_lanes(pieces: Iterator[torch.Tensor], sink: Sink, *, device: torch.device, frame_shape: tuple[int, int, int],
              frames_per_chunk: int, chunk: int, buffers: Buffers, k: int = 2, sync: bool = False,
              progress: Progress | None = None, jitter: Jitter | None = None) -> LaneStats:
    """Decode `pieces` (see decode.decode_stream) `chunk` at a time into uint8 frames and write them to `sink`.

    `frames_per_chunk` bounds the frames that `chunk` pieces can hold; `frame_shape` is the padded [H, W, 3].
    On failure anywhere, all lanes stop, `sink.abort()` runs, and the first error is raised.
    """
    if sync:
        k = 1
    buffers.setup(k, frames_per_chunk, frame_shape, device)
    lanes = (_CudaLanes if device.type == "cuda" else _ThreadLanes)(buffers, device, k, jitter)
    stats = LaneStats()
    t0 = time.perf_counter()
    try:
        if sync:
            _run_serial(pieces, sink, chunk, buffers, lanes, stats, progress, jitter)
        else:
            _run_overlapped(pieces, sink, chunk, buffers, lanes, stats, progress, jitter)
    except BaseException:
        sink.abort()
        raise
    finally:
        lanes.close()
    stats.wall_s = time.perf_counter() - t0
    return stats


def _fill_chunk(pieces, chunk: int, out: torch.Tensor, before_first_write: Callable[[], None]) -> int:
    """Decode up to `chunk` pieces into `out`; return the frame count (0 when the stream is done)."""
    count = 0
    for _ in range(chunk):
        piece = next(pieces, None)
        if piece is None:
            break
        if count == 0:
            before_first_write()
        f = piece.shape[2]
        to_uint8_frames(piece, out[count : count + f])
        count += f
    return count


def _run_overlapped(pieces, sink, chunk, buffers, lanes, stats, progress, jitter) -> None:
    k = len(buffers.vram)
    slot_free = [threading.Semaphore(1) for _ in range(k)]
    work: queue.Queue[tuple[int, int, int] | None] = queue.Queue()
    stop = threading.Event()
    failure: list[BaseException] = []

    def encode_lane() -> None:
        try:
            while (item := work.get()) is not None and not stop.is_set():
                slot, n, index = item
                lanes.wait_copied(slot, stop)
                for lane in ("decode", "copy"):
                    start, end = lanes.span(lane, slot)
                    stats.busy_s[lane] += end - start
                    stats.spans.append((lane, index, start, end))
                if progress:
                    progress.advance("copy", n)
                if jitter:
                    time.sleep(jitter("encode"))
                t = time.perf_counter()
                sink.write(buffers.host[slot][:n])
                t_end = time.perf_counter()
                stats.busy_s["encode"] += t_end - t
                stats.spans.append(("encode", index, t - lanes.t0, t_end - lanes.t0))
                if progress:
                    progress.advance("encode", n)
                slot_free[slot].release()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            failure.append(e)
            stop.set()

    worker = threading.Thread(target=encode_lane, name="vaepipe-encode", daemon=True)
    worker.start()
    try:
        n_chunk = 0
        while True:
            slot = n_chunk % k
            # Host-side barrier: the worker is done with host[slot], hence the copy out of vram[slot] is done too.
            while not slot_free[slot].acquire(timeout=0.05):
                if stop.is_set():
                    break
            if stop.is_set():
                break
            with lanes.decode_lane(slot):
                n = _fill_chunk(pieces, chunk, buffers.vram[slot], lambda s=slot: lanes.before_vram_write(s))
            if n == 0:
                slot_free[slot].release()
                break
            lanes.copy(slot, n)
            work.put((slot, n, n_chunk))
            stats.chunk_frames.append(n)
            stats.frames += n
            stats.chunks += 1
            if progress:
                progress.advance("decode", n)
            n_chunk += 1
        work.put(None)
        worker.join()
    except BaseException:  # also Ctrl-C while joining: the worker must not outlive the lanes
        stop.set()
        sink.abort()  # unblocks a worker stuck writing to the encoder
        work.put(None)
        worker.join()
        raise
    if failure:
        raise failure[0]


def _run_serial(pieces, sink, chunk, buffers, lanes, stats, progress, jitter) -> None:
    """--sync: the same chunks, decoded, copied and written one after another on one stream."""
    vram, host = buffers.vram[0], buffers.host[0]
    while True:
        t = time.perf_counter()
        if jitter:
            time.sleep(jitter("decode"))
        n = _fill_chunk(pieces, chunk, vram, lambda: None)
        lanes.synchronize()
        if n == 0:
            break
        t1 = time.perf_counter()
        host[:n].copy_(vram[:n])
        t2 = time.perf_counter()
        sink.write(host[:n])
        t3 = time.perf_counter()
        for lane, start, end in zip(LANES, (t, t1, t2), (t1, t2, t3), strict=True):
            stats.busy_s[lane] += end - start
            stats.spans.append((lane, stats.chunks, start - lanes.t0, end - lanes.t0))
            if progress:
                progress.advance(lane, n)
        stats.chunk_frames.append(n)
        stats.frames += n
        stats.chunks += 1


class _CudaLanes:
    """Compute and copy streams with per-slot events. Events are reused per slot: the host-side slot barrier
    guarantees a slot's events are not re-recorded before the worker has read them."""

    def __init__(self, buffers: Buffers, device: torch.device, k: int, jitter: Jitter | None):
        self.buffers = buffers
        self.device = device
        self.jitter = jitter
        self.compute = torch.cuda.Stream(device)
        self.copy_stream = torch.cuda.Stream(device)
        # The model and the latents were put on the device on the current stream: start after that work.
        self.compute.wait_stream(torch.cuda.current_stream(device))

        def events() -> list[torch.cuda.Event]:
            return [torch.cuda.Event(enable_timing=True) for _ in range(k)]

        self.decode_start, self.decoded, self.copy_start, self.copied = events(), events(), events(), events()
        # Reference point of the timeline: GPU event times are taken relative to this event, host times to t0.
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record(self.compute)
        self.t0 = time.perf_counter()

    def _sleep(self, lane: str) -> None:
        if self.jitter and (seconds := self.jitter(lane)) > 0:
            torch.cuda._sleep(int(seconds * 1.5e9))  # a GPU-side delay in the current stream (cycles)

    class _Lane:
        def __init__(self, outer: _CudaLanes, slot: int):
            self.outer, self.slot = outer, slot

        def __enter__(self):
            self.ctx = torch.cuda.stream(self.outer.compute)
            self.ctx.__enter__()
            self.outer.decode_start[self.slot].record(self.outer.compute)
            self.outer._sleep("decode")

        def __exit__(self, *exc):
            self.outer.decoded[self.slot].record(self.outer.compute)
            self.ctx.__exit__(*exc)

    def decode_lane(self, slot: int) -> _Lane:
        return self._Lane(self, slot)

    def before_vram_write(self, slot: int) -> None:
        # GPU-side barrier: do not overwrite vram[slot] before the copy stream has read it out.
        self.compute.wait_event(self.copied[slot])

    def copy(self, slot: int, n: int) -> None:
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.decoded[slot])
            self.copy_start[slot].record(self.copy_stream)
            self._sleep("copy")
            self.buffers.host[slot][:n].copy_(self.buffers.vram[slot][:n], non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def wait_copied(self, slot: int, stop: threading.Event) -> None:
        self.copied[slot].synchronize()

    def span(self, lane: str, slot: int) -> tuple[float, float]:
        """When `lane` ran on `slot` (its end event has completed), in seconds since t0."""
        start, end = (self.decode_start, self.decoded) if lane == "decode" else (self.copy_start, self.copied)
        return self.origin.elapsed_time(start[slot]) / 1e3, self.origin.elapsed_time(end[slot]) / 1e3

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        # Nothing may still read or write the buffers when they are reused or freed (also after an error or OOM).
        self.compute.synchronize()
        self.copy_stream.synchronize()


class _ThreadLanes:
    """The CPU stand-in: the main thread decodes, a copy thread copies, threading events are the barriers."""

    def __init__(self, buffers: Buffers, device: torch.device, k: int, jitter: Jitter | None):
        self.buffers = buffers
        self.jitter = jitter
        self.copied = [threading.Event() for _ in range(k)]
        for e in self.copied:
            e.set()
        self.t0 = time.perf_counter()
        self.times = {lane: [(0.0, 0.0)] * k for lane in ("decode", "copy")}
        self.error: BaseException | None = None
        self._jobs: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._copy_lane, name="vaepipe-copy", daemon=True)
        self._thread.start()

    def _copy_lane(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                slot, n = job
                if self.jitter:
                    time.sleep(self.jitter("copy"))
                t = time.perf_counter() - self.t0
                self.buffers.host[slot][:n].copy_(self.buffers.vram[slot][:n])
                self.times["copy"][slot] = (t, time.perf_counter() - self.t0)
                self.copied[slot].set()
        except BaseException as e:  # noqa: BLE001 - raised in the thread that waits on this lane
            self.error = e
            for event in self.copied:
                event.set()

    class _Lane:
        def __init__(self, outer: _ThreadLanes, slot: int):
            self.outer, self.slot = outer, slot

        def __enter__(self):
            if self.outer.jitter:
                time.sleep(self.outer.jitter("decode"))
            self.t = time.perf_counter() - self.outer.t0

        def __exit__(self, *exc):
            self.outer.times["decode"][self.slot] = (self.t, time.perf_counter() - self.outer.t0)

    def decode_lane(self, slot: int) -> _Lane:
        return self._Lane(self, slot)

    def before_vram_write(self, slot: int) -> None:
        self.copied[slot].wait()
        if self.error:
            raise self.error

    def copy(self, slot: int, n: int) -> None:
        self.copied[slot].clear()
        self._jobs.put((slot, n))

    def wait_copied(self, slot: int, stop: threading.Event) -> None:
        while not self.copied[slot].wait(timeout=0.05):
            if stop.is_set():
                raise RuntimeError("stopped")
        if self.error:
            raise self.error

    def span(self, lane: str, slot: int) -> tuple[float, float]:
        return self.times[lane][slot]

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
