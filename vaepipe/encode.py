"""Encoding: raw RGB frames into an ffmpeg subprocess, written beside the destination and renamed into place only
on success, so a failure or Ctrl-C never leaves a partial file behind."""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput, VaepipeError
from .ffmpeg import ffmpeg_exe, file_size_limit
from .mux import Audio, Mux, check_metadata, for_sample, plan_mux

if TYPE_CHECKING:  # torch only names a type here: the command line's help imports this module, and torch takes seconds
    import torch

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# The speed ladders of the other encoders, indexed like X264_PRESETS (slowest last).
_SVT_AV1 = (12, 11, 10, 9, 8, 6, 5, 4, 2)
_VP9_CPU_USED = (8, 7, 6, 5, 4, 3, 2, 1, 0)
_NVENC = ("p1", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p7")
_X264_LOOKAHEAD = (0, 0, 10, 20, 30, 40, 50, 60, 60)  # x264's own rc-lookahead per preset

MIN_FPS = 0.1
PIX_FMTS = ("yuv420p", "yuv420p10le", "yuv444p", "yuv422p10le", "yuv444p10le", "rgb24")
_CHROMA_420 = {"yuv420p", "yuv420p10le"}
_CHROMA_422 = {"yuv422p10le"}


@dataclass(frozen=True, slots=True)
class Codec:
    encoder: str
    pix_fmts: tuple[str, ...]  # the first one is the default
    containers: tuple[str, ...]
    crf_max: int | None  # None: the encoder has no constant-quality knob we map --crf to
    hardware: bool = False

    def quality_args(self, crf: int, preset: str) -> list[str]:
        i = X264_PRESETS.index(preset)
        match self.encoder:
            case "libx264":
                # A short tail: x264 holds rc-lookahead frames after the last one goes in (40 at medium); 20 keeps
                # the same size-for-quality (docs/benchmarks.md: ~7 % smaller, -0.1 dB at the same CRF).
                lookahead = ["-rc-lookahead", "20"] if _X264_LOOKAHEAD[i] > 20 else []
                return ["-crf", str(crf), "-preset", preset, *lookahead]
            case "libx265":
                return ["-crf", str(crf), "-preset", preset]
            case "libsvtav1":
                return ["-crf", str(crf), "-preset", str(_SVT_AV1[i])]
            case "libvpx-vp9":
                return ["-crf", str(crf), "-b:v", "0", "-deadline", "good", "-cpu-used", str(_VP9_CPU_USED[i]),
                        "-row-mt", "1"]
            case "prores_ks":
                return ["-profile:v", "3"]  # ProRes 422 HQ: quality is set by the profile, not by a CRF
            case "ffv1":
                return ["-level", "3", "-slicecrc", "1"]
            case "png":
                return []
            case _:  # NVENC
                return ["-rc", "vbr", "-cq", str(crf), "-b:v", "0", "-preset", _NVENC[i]]


_VIDEO = (".mp4", ".mkv", ".mov")
CODECS: dict[str, Codec] = {
    "h264": Codec("libx264", ("yuv420p", "yuv420p10le", "yuv444p"), _VIDEO, 51),
    "h265": Codec("libx265", ("yuv420p", "yuv420p10le", "yuv444p"), _VIDEO, 51),
    "av1": Codec("libsvtav1", ("yuv420p", "yuv420p10le"), (".mp4", ".mkv", ".webm"), 63),
    "vp9": Codec("libvpx-vp9", ("yuv420p", "yuv420p10le", "yuv444p"), (".mp4", ".mkv", ".webm"), 63),
    "prores": Codec("prores_ks", ("yuv422p10le", "yuv444p10le"), (".mov", ".mkv"), None),
    "ffv1": Codec("ffv1", ("rgb24", "yuv420p", "yuv420p10le", "yuv444p"), (".mkv",), None),
    "png": Codec("png", ("rgb24",), (".png",), None),
    "h264_nvenc": Codec("h264_nvenc", ("yuv420p", "yuv444p"), _VIDEO, 51, hardware=True),
    "hevc_nvenc": Codec("hevc_nvenc", ("yuv420p", "yuv420p10le", "yuv444p"), _VIDEO, 51, hardware=True),
    "av1_nvenc": Codec("av1_nvenc", ("yuv420p", "yuv420p10le"), (".mp4", ".mkv", ".webm"), 51, hardware=True),
}
_NAME_MAX = 255  # bytes in one file name, on every file system Linux writes videos to (ext4, xfs, btrfs, tmpfs)
_MUXERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".png": "image2"}


def check_crf(crf: int, codec: str, origin: str = "") -> None:
    """`crf` against the range of the codec that writes the file (only its range: the others do not apply)."""
    top = CODECS[codec].crf_max
    if crf < 0 or (top is not None and crf > top):
        allowed = f"in 0..{top} for {codec}" if top is not None else f"at least 0 ({codec} takes no crf: leave it out)"
        raise BadInput(f"crf must be {allowed}, got {crf}{origin}")


@dataclass(kw_only=True, slots=True)
class EncodeOptions:
    codec: str | None = None
    """h264, h265, av1, vp9, prores, ffv1, png or an NVENC encoder; None picks from the output's extension."""
    crf: int = 18
    """Constant-quality level (lower is better)."""
    preset: str = "medium"
    """Speed/size trade-off, in x264's names; mapped onto the other encoders' ladders."""
    pix_fmt: str | None = None
    """Output pixel format; None takes the codec's first (yuv420p for the delivery codecs)."""
    fps: float | None = None
    """Frame rate; None takes the latents file's fps, else 16."""
    pad: bool = True
    """Pad odd sizes by edge replication where the pixel format subsamples chroma."""
    audio: str | None = None
    """A soundtrack to mux: stream-copied where the container takes its codec, else AAC (MP4/MOV) or Opus (WebM)."""
    cut_audio: bool = True
    """Cut the soundtrack at the video's end; False keeps all of it (the file then lasts as long as the longer)."""
    metadata: dict | None = None
    """Tags to write beside those the latents file records (KEY: value; a given KEY wins)."""
    no_metadata: bool = False
    """Write no tags at all."""
    encoders: int | str = "auto"
    """Concurrent encoders for one output (segment-parallel encoding, see segments.py): N, or auto."""

    def __post_init__(self) -> None:
        if not isinstance(self.crf, int) or isinstance(self.crf, bool):
            raise BadInput(f"crf must be an integer, got {self.crf!r}")
        if self.fps is not None and (not isinstance(self.fps, int | float) or isinstance(self.fps, bool)):
            raise BadInput(f"fps must be a number, got {self.fps!r}")
        if self.codec is not None and self.codec not in CODECS:
            raise BadInput(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.preset not in X264_PRESETS:
            raise BadInput(f"preset must be one of {', '.join(X264_PRESETS)}, got {self.preset!r}")
        if self.pix_fmt is not None and self.pix_fmt not in PIX_FMTS:
            raise BadInput(f"pix_fmt must be one of {', '.join(PIX_FMTS)}, got {self.pix_fmt!r}")
        if self.codec is not None:  # else the codec comes from the extension: plan_encode checks crf against it
            check_crf(self.crf, self.codec)
        # Below 0.1 fps, MP4 and MOV cannot store a clip's frame times (ffmpeg fails when the file is written).
        if self.fps is not None and not MIN_FPS <= self.fps <= 1000:
            raise BadInput(f"fps must be in {MIN_FPS:g}..1000 (frame rates video containers store), got {self.fps}")
        if self.audio is not None:
            self.audio = os.fspath(self.audio)
            if not self.audio:
                raise BadInput("audio must name a sound file, got an empty path")
        if self.metadata is not None:
            if not isinstance(self.metadata, dict):
                raise BadInput(f"metadata must be a table of KEY = value, got {self.metadata!r}")
            check_metadata(self.metadata)
            if self.metadata and self.no_metadata:
                raise BadInput("metadata given and no_metadata set: drop one (--no-metadata writes no tags at all)")
        if isinstance(self.encoders, str) and self.encoders.isdigit():
            self.encoders = int(self.encoders)  # from the command line
        if self.encoders != "auto" and not (type(self.encoders) is int and 1 <= self.encoders <= 64):
            raise BadInput(f"encoders must be auto or a number in 1..64, got {self.encoders!r}")


@dataclass(frozen=True, slots=True)
class EncodePlan:
    """What will be written: resolved codec, format and sizes, checked before any GPU work."""

    dest: Path
    codec: str
    pix_fmt: str
    fps: float
    width: int  # the decoded frame size
    height: int
    pad_right: int  # edge-replicated columns and rows added for chroma subsampling
    pad_bottom: int
    crf: int
    preset: str
    mux: Mux = Mux()
    """Soundtrack and tags, planned by `with_mux` once the clip's length is known."""
    encoders: int | str = 1
    """Concurrent encoders asked for (N or auto); segments.segment_lengths decides how many are used."""

    @property
    def is_sequence(self) -> bool:
        return self.codec == "png"

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.height + self.pad_bottom, self.width + self.pad_right, 3


def plan_encode(dest: str | os.PathLike, *, width: int, height: int, fps: float, options: EncodeOptions) -> EncodePlan:
    """Resolve codec, pixel format and padding for a destination; raise BadInput for any mismatch."""
    dest = Path(dest)
    long = [part for part in dest.parts if len(os.fsencode(part)) > _NAME_MAX]
    if long:  # before the file system is asked anything about it: it answers ENAMETOOLONG
        raise BadInput(f"cannot write {str(dest)[:60]!r}…: the name {long[0][:40]!r}… is {len(os.fsencode(long[0]))}"
                       f" bytes, more than a file name may be ({_NAME_MAX}); choose a shorter name")
    if dest.is_dir():
        raise BadInput(f"{str(dest)!r} is a folder: name a file in it, such as {str(dest / 'out.mp4')!r}")
    suffix = dest.suffix.lower()
    if suffix not in _MUXERS:
        raise BadInput(f"cannot tell the container from {str(dest)!r}: use a name ending in .mp4, .mkv, .mov or .webm,"
                       " or a PNG sequence pattern such as frames/%05d.png")
    if suffix == ".png" and "%" not in dest.name:
        raise BadInput(f"{str(dest)!r} names one PNG file: use a numbered pattern such as frames/%05d.png")
    codec = options.codec or {".png": "png", ".webm": "vp9"}.get(suffix, "h264")
    spec = CODECS[codec]
    if suffix not in spec.containers:
        raise BadInput(f"codec {codec} cannot be written to a {suffix} file: use one of {', '.join(spec.containers)}"
                       f" or another --codec")
    pix_fmt = options.pix_fmt or spec.pix_fmts[0]
    if pix_fmt not in spec.pix_fmts:
        raise BadInput(f"codec {codec} does not take pix_fmt {pix_fmt}: use one of {', '.join(spec.pix_fmts)}")
    check_crf(options.crf, codec)
    need_even_w = pix_fmt in _CHROMA_420 | _CHROMA_422
    need_even_h = pix_fmt in _CHROMA_420
    pad_right, pad_bottom = int(need_even_w and width % 2), int(need_even_h and height % 2)
    if (pad_right or pad_bottom) and not options.pad:
        raise BadInput(f"frames are {width}x{height} but {pix_fmt} needs even sizes: drop --no-pad to pad by edge"
                       " replication, or use --pix-fmt yuv444p")
    if codec == "png" and options.encoders not in (1, "auto"):
        raise BadInput(f"a PNG sequence is written frame by frame and cannot be split into segments: drop --encoders"
                       f" {options.encoders} (or use 1)")
    if spec.hardware:
        ok, why = probe_encoder(spec.encoder)
        if not ok:
            raise BadInput(f"{spec.encoder} does not work on this machine ({why}): use --codec h264 (libx264)")
    return EncodePlan(dest=dest, codec=codec, pix_fmt=pix_fmt, fps=fps, width=width, height=height,
                      pad_right=pad_right, pad_bottom=pad_bottom, crf=options.crf, preset=options.preset,
                      encoders=options.encoders)


def with_mux(plans: list[EncodePlan], encode: EncodeOptions, *, audio: Audio | None, recorded: dict,
             frames: int) -> list[EncodePlan]:
    """`plans` (one per sample of a batch) with their Mux: the soundtrack, cut to `frames` at the plans' fps, and
    each sample's tags from what its latents recorded and what `encode` gives."""
    out = []
    for b, plan in enumerate(plans):
        seconds = frames / float(f"{plan.fps:g}")  # at the rate ffmpeg is given (encode.py writes it with :g)
        mux = plan_mux(plan.dest.suffix.lower(), audio=audio, cut_audio=encode.cut_audio, seconds=seconds,
                       recorded=for_sample(recorded, b, len(plans)),
                       given=for_sample(encode.metadata or {}, b, len(plans)), no_metadata=encode.no_metadata)
        out.append(replace(plan, mux=mux))
    return out


def check_frame_size(plan: EncodePlan) -> None:
    """Frames larger than every encoder takes (4096 on a side) are tried on this one first: x264 stops at 16384,
    SVT-AV1's height at 8704, and a hostile latents file should not cost a long decode that ffmpeg then refuses.
    Call after the memory check: the probe makes one such frame."""
    h, w, _ = plan.frame_shape
    if max(w, h) <= 4096:
        return
    encoder = CODECS[plan.codec].encoder
    ok, why = probe_encoder(encoder, (w, h), plan.pix_fmt)
    if not ok:
        why = re.sub(r"\[[^\]]* @ 0x[0-9a-f]+\]\s*", "", why)  # ffmpeg's "[enc:libx264 @ 0x55…]" prefixes
        raise BadInput(f"{encoder} cannot encode frames of {w}x{h} ({why}): decode smaller latents, or choose a codec"
                       " that takes larger frames (--codec vp9 up to 65536, ffv1, png)")


def check_writable(dest: str | os.PathLike) -> None:
    """Fail before any work where `dest` cannot be written: its temporary file goes in a folder that must be
    writable, or be creatable in the nearest folder that exists. Tried with a real file, which is what counts (a
    read-only mount, a folder that is a file, permissions that root ignores but a file system does not)."""
    # Both the temporary output's folder and the destination's (a PNG pattern's own folder): under a file, the
    # sequence would be decoded whole and then fail to move into place.
    for folder in (Path(os.path.abspath(Path(dest).parent)), Path(os.path.abspath(_temp_home(Path(dest))[0]))):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise BadInput(f"cannot write {str(dest)!r}: {str(existing)!r} is a file, not a folder; choose another"
                           " output")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vaepipe-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInput(f"cannot write {str(dest)!r}: the folder {str(existing)!r} is not writable ({e.strerror});"
                       " choose another output folder or change its permissions") from None


@functools.cache
def probe_encoder(encoder: str, size: tuple[int, int] = (256, 256), pix_fmt: str | None = None) -> tuple[bool, str]:
    """Encode one real frame: listed encoders (NVENC on an H100, say) can still lack the hardware behind them, and
    each has its own largest frame. `size` is (width, height)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
           "-i", f"color=c=gray:s={size[0]}x{size[1]}:r=1", "-frames:v", "1", "-c:v", encoder,
           *(["-pix_fmt", pix_fmt] if pix_fmt else []), "-f", "null", "-"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    lines = run.stderr.strip().splitlines()
    # The first line that says why ("No capable devices found", "OpenEncodeSessionEx failed"), not the muxer's
    # closing complaint that nothing was written.
    why = next((line for line in lines if any(w in line.lower() for w in ("error", "fail", "cannot", "no capable",
                                                                          "not supported", "unsupported"))), None)
    return run.returncode == 0, why or (lines[-1] if lines else f"exit code {run.returncode}")


def _command(plan: EncodePlan, target: Path, tags_file: Path | None = None) -> list[str]:
    h, w, _ = plan.frame_shape
    spec = CODECS[plan.codec]
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", f"{plan.fps:g}", "-i", "pipe:0",
           *plan.mux.input_args(tags_file), *plan.mux.output_args(tags_file),
           "-c:v", spec.encoder, *spec.quality_args(plan.crf, plan.preset), "-pix_fmt", plan.pix_fmt]
    if plan.pix_fmt != "rgb24":
        # swscale converts RGB with BT.601 unless told; convert with BT.709 and say so in the stream.
        # setparams: encoder-side -color_* flags alone leave primaries and transfer unset in the stream.
        cmd += ["-vf", f"scale=out_color_matrix=bt709:out_range=tv,format={plan.pix_fmt},"
                "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"]
    if plan.is_sequence:
        cmd += ["-start_number", "0"]  # file N holds frame N
    return [*cmd, *mux_args(plan), "-y", str(target)]


def mux_args(plan: EncodePlan) -> list[str]:
    """The container's options, last on the command line: also what joins a segmented output (segments.py)."""
    suffix = plan.dest.suffix.lower()
    args = []
    if suffix in (".mp4", ".mov"):
        args += ["-movflags", "+faststart"]
        if plan.codec in ("h265", "hevc_nvenc"):
            args += ["-tag:v", "hvc1"]  # the tag Apple players need for HEVC
    # Same frames, same bytes: no random container IDs, creation times or version strings.
    return [*args, "-fflags", "+bitexact", "-flags:v", "+bitexact", "-f", _MUXERS[suffix]]


def frame_files(dest: Path) -> list[Path]:
    """The files of a frame pattern such as frames/%05d.png that exist, in order (nothing else in the folder)."""
    pattern = re.compile(re.sub(r"%0?\d*d", r"\\d+", re.escape(dest.name)))
    folder = dest.parent
    return sorted(p for p in folder.glob(f"*{dest.suffix}") if pattern.fullmatch(p.name)) if folder.is_dir() else []


def check_frames_folder(plan: EncodePlan, frames: int) -> None:
    """Before any work: a PNG sequence of `frames` goes into a folder where no file named like its frames (an
    older, longer clip's, someone's 7.png) would stay beside it, since vaepipe deletes no file it did not write."""
    if not plan.is_sequence:
        return
    try:
        ours = {plan.dest.name % i for i in range(frames)}
    except (TypeError, ValueError):
        raise BadInput(f"{plan.dest.name!r} is not a frame pattern: use one %d, such as %05d.png") from None
    others = [p.name for p in frame_files(plan.dest) if p.name not in ours]
    if others:
        raise BadInput(f"{str(plan.dest.parent)!r} already holds {len(others)} file{'s' if len(others) > 1 else ''}"
                       f" named like {plan.dest.name} that this clip's {frames} frames would not replace"
                       f" ({', '.join(others[:2])}{', …' if len(others) > 2 else ''}): remove them or choose another"
                       " folder (vaepipe deletes no file it did not write)")


def _temp_home(dest: Path) -> tuple[Path, str]:
    """Where a destination's temporary output goes, and the name it is derived from (a sequence's folder): the
    destination's own, or, where that with what vaepipe adds (`.NAME.vaepipe-PID-ID.tags.part`) would pass the
    file system's limit on a name (255 bytes), its start and a hash of the whole."""
    folder, name = (dest.parent.parent, dest.parent.name or "frames") if "%" in dest.name else (dest.parent, dest.name)
    raw = os.fsencode(name)
    if len(raw) > _NAME_MAX - 64:
        name = os.fsdecode(raw[:100]) + "~" + hashlib.sha256(raw).hexdigest()[:16]
    return folder, name


class Encoder:
    """One ffmpeg process: one thread calls `write` with frames, then `finish` (publish) or `abort` (kill,
    remove). `abort` may come from another thread, to unblock a writer stuck on a full pipe."""

    def __init__(self, plan: EncodePlan):
        self.plan = plan
        self.frames = 0
        dest = plan.dest
        folder, name = _temp_home(dest)
        self._tmp = folder / f".{name}.vaepipe-{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
        try:
            _remove_stale_parts(dest)
            folder.mkdir(parents=True, exist_ok=True)
            if plan.is_sequence:
                self._tmp.mkdir()
        except OSError as e:
            raise VaepipeError(f"cannot write {dest}: {e}") from None
        target = self._tmp / dest.name if plan.is_sequence else self._tmp
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._tags: Path | None = None
        try:
            # Beside the output, named like it, so that a killed run's stale-part clean-up takes it too.
            self._tags = plan.mux.write_tags(self._tmp.with_name(self._tmp.name.removesuffix(".part") + ".tags.part"))
            # Own session: a terminal's Ctrl-C reaches vaepipe, which stops ffmpeg itself, rather than ffmpeg directly.
            self._proc = subprocess.Popen(_command(plan, target, self._tags), stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            self._remove_tmp()
            raise VaepipeError(f"could not start ffmpeg: {e}") from None
        # Drain stderr on its own thread: a full pipe buffer would block ffmpeg and then us.
        self._drain = threading.Thread(target=self._read_stderr, name="vaepipe-ffmpeg-stderr", daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        for line in iter(self._proc.stderr.readline, b""):
            self._stderr.append(line.decode(errors="replace").rstrip())

    def _failure(self, what: str) -> VaepipeError:
        self._drain.join(timeout=5)
        limit = file_size_limit(self._proc.returncode, self.plan.dest)
        if limit:
            return limit
        tail = "\n".join(self._stderr)
        return VaepipeError(f"ffmpeg {what} (exit code {self._proc.returncode})" + (f":\n{tail}" if tail else ""))

    def write(self, frames: torch.Tensor) -> None:
        """Frames: uint8 [F, H, W, 3] on the CPU, contiguous."""
        try:
            self._proc.stdin.write(memoryview(frames.numpy()).cast("B"))
        except (BrokenPipeError, ValueError, OSError):
            self._proc.wait()
            raise self._failure("stopped while receiving frames") from None
        self.frames += frames.shape[0]

    def finish(self) -> Path:
        """Close the input, wait for ffmpeg, and move the file into place; on any failure, clean up and raise."""
        try:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            if self._proc.wait() != 0:
                raise self._failure("failed")
            self._drain.join()
            try:
                self._publish()
            except OSError as e:
                raise VaepipeError(f"cannot move the finished video to {self.plan.dest}: {e}") from None
            if self._tags:
                self._tags.unlink(missing_ok=True)
        except BaseException:
            self.abort()
            raise
        return self.plan.dest

    def abort(self) -> None:
        """Kill ffmpeg (if it still runs), reap it and remove the temporary output. Safe to call twice."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._drain.join(timeout=5)  # ffmpeg is gone, so its stderr is at EOF
        for pipe in (self._proc.stdin, self._proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            self._tmp.unlink(missing_ok=True)
        if self._tags:
            self._tags.unlink(missing_ok=True)

    def _publish(self) -> None:
        dest = self.plan.dest
        if not self.plan.is_sequence:
            os.replace(self._tmp, dest)
            return
        if not dest.parent.exists():
            os.replace(self._tmp, dest.parent)  # a new folder: one atomic rename
            return
        # Into an existing folder frame by frame, replacing frames of the same names; `check_frames_folder` made
        # sure that no other file there is named like a frame (nothing the run did not write is deleted).
        for frame in sorted(self._tmp.iterdir()):
            os.replace(frame, dest.parent / frame.name)
        self._tmp.rmdir()

    def output_bytes(self) -> int:
        if self.plan.is_sequence:
            return sum(f.stat().st_size for f in frame_files(self.plan.dest))
        return self.plan.dest.stat().st_size


def _remove_stale_parts(dest: Path) -> None:
    """A killed run (SIGKILL, power loss) can leave its hidden temporary output; remove those of dead processes."""
    folder, name = _temp_home(dest)
    for part in folder.glob(f".{glob.escape(name)}.vaepipe-*.part"):
        pid = part.name.removeprefix(f".{name}.vaepipe-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(part, ignore_errors=True) if part.is_dir() else part.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def output_sha256(dest: Path) -> str | None:
    """SHA-256 of a finished output (None if there is none); for a frame pattern (frames/%05d.png), of its
    frames' names and bytes, in order."""
    if "%" in dest.name:
        frames = frame_files(dest)
        if not frames:
            return None
        digest = hashlib.sha256()
        for frame in frames:
            digest.update(frame.name.encode() + b"\0")
            with open(frame, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        return digest.hexdigest()
    try:
        with open(dest, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None
