"""Muxing: what goes into the video file beside the frames — a soundtrack and the tags that say what made it.

Planned once per output before any GPU work (a bad audio file is bad input, and nothing is written); encode.py puts
`Mux.input_args` and `Mux.output_args` into the one ffmpeg command that writes the file.

Tags: the video's `title` is the prompt; its `comment` is one JSON object of everything else that made it (seed,
model, steps, a ComfyUI workflow…), so every container keeps all of it (MP4 stores only a fixed set of tag names) and
tools read it back as JSON (VideoHelperSuite writes ComfyUI workflows the same way). Standard tag names given with
--metadata (title, comment, artist, date…) are written as they are.

Every value is stored exactly or not at all: a tag goes to ffmpeg as a `-metadata KEY=VALUE` argument, which passes
every character but NUL as it is (CR, control characters, a trailing backslash); only a value too large for one
argument goes through an ffmetadata file, escaped. A value that cannot be stored exactly (a NUL, a lone surrogate,
too long for a .mov tag) is refused where the user gave it, and left out with a warning where a latents file
recorded it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .ffmpeg import ffmpeg_exe
from .files import regular_file

# Audio codecs each container takes as they are (stream copy); anything else is encoded: AAC into MP4/MOV, Opus into
# WebM, FLAC into Matroska. Kept to what common players read, not to all that ffmpeg would mux.
_COPY = {
    ".mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus"},
    ".mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_f32le"},
    ".mkv": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "vorbis", "flac", "dts", "truehd", "pcm_s16le", "pcm_s24le",
             "pcm_s32le", "pcm_f32le"},
    ".webm": {"opus", "vorbis"},
}
_ENCODE = {".mp4": ["-c:a", "aac", "-b:a", "192k"], ".mov": ["-c:a", "aac", "-b:a", "192k"],
           ".webm": ["-c:a", "libopus", "-b:a", "160k"], ".mkv": ["-c:a", "flac"]}

# Tag names ffmpeg's MP4/MOV muxer stores under their own name (others it drops without a word); written as given.
STANDARD_TAGS = ("title", "comment", "description", "synopsis", "artist", "album_artist", "album", "composer",
                 "genre", "date", "copyright", "keywords", "grouping", "show", "episode_id", "network", "lyrics")
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# A value up to this size goes on ffmpeg's command line (Linux takes 128 KiB an argument, 2 MiB in all: 17 tags of
# 32 KiB fit); a larger one (a ComfyUI workflow) goes through the ffmetadata file.
_ARG_BYTES = 32 * 1024
_MOV_TAG_BYTES = 65535  # a QuickTime text atom's 16-bit length: ffmpeg's mov muxer wraps longer values around


@dataclass(frozen=True, slots=True)
class Audio:
    path: Path
    codec: str
    """ffmpeg's name of its first audio stream's codec (aac, mp3, opus, pcm_s16le…)."""


@dataclass(frozen=True, slots=True)
class Mux:
    """Everything besides the frames that goes into one output."""

    audio: Audio | None = None
    audio_args: tuple[str, ...] = ()
    """`-c:a copy` or an encoder and its bitrate."""
    audio_seconds: float | None = None
    """Cut the soundtrack to this length (the video's); None keeps all of it."""
    tags: tuple[tuple[str, str], ...] = ()
    strip: bool = False
    """Write no tags at all (--no-metadata), not even those ffmpeg would copy from the audio file."""
    notes: tuple[str, ...] = ()
    """Tags a latents file recorded that cannot be stored exactly, each left out with its reason (a warning)."""

    def input_args(self, tags_file: Path | None) -> list[str]:
        """ffmpeg inputs after the frames (input 0): the soundtrack, then the tags file that `write_tags` made."""
        args = []
        if self.audio is not None:
            if self.audio_seconds is not None:
                args += ["-t", f"{self.audio_seconds:.6f}"]  # an input option: the audio is read only this far
            args += ["-i", str(self.audio.path)]
        if tags_file is not None:
            args += ["-f", "ffmetadata", "-i", str(tags_file)]
        return args

    def output_args(self, tags_file: Path | None) -> list[str]:
        if self.audio is None:
            args = ["-an"]
        else:
            args = ["-map", "0:v:0", "-map", "1:a:0", *self.audio_args]
            if self.audio_args[1] != "copy":
                args += ["-flags:a", "+bitexact"]  # same frames and sound, same bytes
        if tags_file is not None:
            args += ["-map_metadata", "2" if self.audio is not None else "1"]
        elif self.strip or self.audio is not None or self.tags:
            args += ["-map_metadata", "-1"]  # the soundtrack's own tags (an album's title…) are not this video's
        for key, value in self.tags:
            if not _in_file(value):
                args += ["-metadata", f"{key}={value}"]  # ffmpeg splits at the first '=': keys hold none
        return args

    def write_tags(self, path: Path) -> Path | None:
        """Write the tags too large for a command-line argument (a ComfyUI workflow) as an ffmetadata file at
        `path`; None when there are none."""
        large = [(k, v) for k, v in self.tags if _in_file(v)]
        if not large:
            return None
        lines = [";FFMETADATA1"] + [f"{_escape(k)}={_escape(v)}" for k, v in large]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def _in_file(value: str) -> bool:
    return len(value.encode("utf-8")) > _ARG_BYTES


def _escape(text: str) -> str:
    # ffmpeg's ffmetadata reader ends a line at an unescaped CR, LF or NUL; '=', ';', '#' and '\\' are its syntax.
    return re.sub(r"([=;#\\\n\r])", r"\\\1", text)


def _unstorable(value: str, suffix: str | None = None) -> tuple[str, str] | None:
    """Why `value` cannot be stored exactly as a tag of a `suffix` file (None: it can), and the fix."""
    if "\0" in value:
        return "holds a NUL character, which no video tag can store", "remove it from the value"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)", "give UTF-8 text"
    if suffix == ".mov" and size > _MOV_TAG_BYTES:
        return (f"is {size} bytes, more than a .mov tag holds ({_MOV_TAG_BYTES})",
                "write .mp4 or .mkv, or a shorter value")
    if size > _ARG_BYTES and value.endswith("\\"):
        # Too large for an argument, so it would go through the ffmetadata file, whose reader takes an escaped
        # backslash before the line's end for an escaped line end and runs on into the next tag.
        return (f"is over {_ARG_BYTES // 1024} KiB and ends in a backslash, which ffmpeg's metadata file cannot"
                " store", "shorten it or drop the last backslash")
    return None


def check_metadata(metadata: dict) -> None:
    """Tag names and values as --metadata and the API take them; raise BadInput naming the first bad one."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise BadInput(f"metadata key {key!r} is not a tag name: use letters, digits, '_', '.' and '-' (at most"
                           " 64), such as prompt or seed")
        scalars = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | float | bool) for v in scalars):
            raise BadInput(f"metadata {key} must be text, a number, or a list of them (one per sample of a batch),"
                           f" got a {type(value).__name__}")
        if key in (*STANDARD_TAGS, "prompt"):  # written as they are (the prompt as the title); the rest as JSON
            for v in scalars:
                problem = _unstorable(v) if isinstance(v, str) else None
                if problem:
                    raise BadInput(f"metadata {key} {problem[0]}: {problem[1]}")


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    """Repeated --metadata KEY=VALUE into a dict (a later KEY wins)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadInput(f"--metadata takes KEY=VALUE, such as --metadata seed=42, got {pair!r}")
        out[key.strip()] = value
    check_metadata(out)
    return out


def container_tags(recorded: dict, given: dict) -> tuple[tuple[str, str], ...]:
    """The tags of one output: what the latents recorded, then what was given (which wins, key by key)."""
    merged = {**recorded, **given}
    tags = {k: _text(v) for k, v in merged.items() if k in STANDARD_TAGS}
    record = {k: v for k, v in merged.items() if k not in STANDARD_TAGS}
    prompt = record.get("prompt")
    if "title" not in tags and isinstance(prompt, str) and prompt.strip():
        tags["title"] = prompt
    if record and "comment" not in tags:
        tags["comment"] = _json(record)
    return tuple((k, v) for k, v in tags.items() if v)  # an empty value is no tag (ffmpeg writes none)


def _text(value) -> str:
    return value if isinstance(value, str) else _json(value)


def _json(value) -> str:
    """JSON as readable as the text in it, but UTF-8 whatever that holds: lone surrogates escaped (\\udXXX),
    which json.dumps leaves as they are with ensure_ascii=False. Control characters and NUL it escapes itself."""
    return re.sub(r"[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def for_sample(metadata: dict, b: int, batch: int) -> dict:
    """Sample b's share of metadata given for a batch: a list with one value per sample gives sample b's."""
    if batch == 1:
        return metadata
    return {k: v[b] if isinstance(v, list) and len(v) == batch else v for k, v in metadata.items()}


def plan_mux(suffix: str, *, audio: Audio | None, cut_audio: bool, seconds: float, recorded: dict,
             given: dict | None, no_metadata: bool) -> Mux:
    """The Mux of one output of container `suffix` (.mp4…, .png for a frame sequence), `seconds` long."""
    if suffix == ".png":
        if audio is not None:
            raise BadInput("a PNG sequence cannot carry a soundtrack: write a video file (.mp4, .mkv, .mov or .webm)"
                           " to add --audio")
        if given:
            raise BadInput("a PNG sequence has no tags to write --metadata into: write a video file, or drop"
                           " --metadata")
        return Mux()
    audio_args: tuple[str, ...] = ()
    if audio is not None:
        audio_args = ("-c:a", "copy") if audio.codec in _COPY[suffix] else tuple(_ENCODE[suffix])
    tags, notes = ((), ()) if no_metadata else storable_tags(suffix, recorded, given or {})
    return Mux(audio=audio, audio_args=audio_args, audio_seconds=seconds if cut_audio else None, tags=tags,
               strip=no_metadata, notes=notes)


def check_given_tags(suffix: str, metadata: dict) -> None:
    """Raise BadInput where tags given for a `suffix` file (a batch job's) cannot be stored exactly, sample by
    sample of a list."""
    samples = max((len(v) for v in metadata.values() if isinstance(v, list)), default=1)
    for b in range(samples):
        storable_tags(suffix, {}, for_sample(metadata, b, samples))


def storable_tags(suffix: str, recorded: dict, given: dict) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """`container_tags` that a `suffix` file stores exactly, and a note for each recorded one left out; raise
    BadInput for a given one that cannot be stored (nothing is written)."""
    mine = dict(container_tags({}, given))
    kept, notes = [], []
    for key, value in container_tags(recorded, given):
        problem = _unstorable(value, suffix)
        if problem is None:
            kept.append((key, value))
        elif mine.get(key) == value:
            raise BadInput(f"metadata {key} {problem[0]}: {problem[1]}")
        else:
            what = " (the stored prompt)" if key == "title" and "title" not in recorded else ""
            notes.append(f"the latents' {key} tag{what} {problem[0]}: left out of the video's tags")
    return tuple(kept), tuple(notes)


def probe_audio(path: str | os.PathLike) -> Audio:
    """Check that `path` holds a soundtrack ffmpeg can read; raise BadInput if not."""
    path = regular_file(path, "audio file", "pass a sound file (.wav, .mp3, .m4a, .flac, .opus…)")
    stat = path.stat()
    return _probe(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _probe(path: Path, size: int, mtime_ns: int) -> Audio:  # size and mtime: a changed file is probed again
    try:
        run = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True,
                             text=True, errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BadInput(f"could not read audio {str(path)!r}: {e}") from None
    # Without an output, ffmpeg describes the input and exits 1; the stream lines say what is there.
    streams = re.findall(r"Stream #\d+:\d+.*?: Audio: ([A-Za-z0-9_]+)", run.stderr)
    if streams:
        _check_decodes(path)
        return Audio(path=path, codec=streams[0])
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    if any(": Video: " in line for line in lines):
        raise BadInput(f"{str(path)!r} holds no audio stream: pass a sound file, or a video whose soundtrack you want")
    why = next((line for line in lines if str(path) in line or "Invalid data" in line), lines[-1] if lines else "")
    raise BadInput(f"could not read audio from {str(path)!r} ({why.split(': ')[-1] or 'ffmpeg found no streams'}):"
                   " pass a sound file ffmpeg reads (.wav, .mp3, .m4a, .flac, .opus…)")


def _check_decodes(path: Path) -> None:
    """Decode the soundtrack's first seconds: ffmpeg names a raw stream (.mp3, .aac, .flac) after the extension and
    finds frame headers in random bytes, which only decoding tells apart from sound; without this, they fail the
    mux after the whole decode."""
    try:
        run = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0",
                              "-t", "5", "-f", "null", "-"], capture_output=True, text=True, errors="replace",
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BadInput(f"could not read audio {str(path)!r}: {e}") from None
    errors = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    if run.returncode != 0 or errors:
        why = re.sub(r"\[[^\]]* @ 0x[0-9a-f]+\]\s*", "", errors[0]) if errors else f"exit code {run.returncode}"
        raise BadInput(f"{str(path)!r} is not decodable audio ({why[:100]}): pass a sound file ffmpeg plays (.wav,"
                       " .mp3, .m4a, .flac, .opus…)")
