"""Batch configs: a TOML file of `[defaults]` and `[[jobs]]`, checked as a whole before any work.

    [defaults]                     # any decode option, under the CLI's names (dashes become underscores)
    vae = "random:wan2.1-tiny"
    crf = 20

    [[jobs]]                       # one latents file, one output
    latents = "latents/a.pt"
    output = "videos/a.mp4"
    crf = 16                       # overrides [defaults]

    [[jobs]]                       # one job per matched file, the output named after the input
    inputs = "latents/more/*.pt"
    output_dir = "videos/more"
    suffix = ".mkv"                # optional, default .mp4
    audio = "music/theme.m4a"      # a soundtrack, like any option (relative to the config)
    metadata = { artist = "me" }   # tags add up key by key: [defaults] < job < command line

Relative paths are relative to the config file. Outputs stay under the config's folder: a config may come from
someone else, so a job whose output or output_dir is absolute or climbs out with `..` is refused unless the command
line allows it (`--allow-outside`). Precedence: command line > job > [defaults] > built-in.
Every problem is reported at once, each with its TOML path (`jobs[3].crf must be in 0..51 for h264, got 60`).
"""

from __future__ import annotations

import difflib
import glob
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .encode import EncodeOptions, check_crf, plan_encode
from .errors import BadInput
from .files import SUFFIXES, not_regular, regular_file
from .mux import check_given_tags
from .options import DecodeOptions

# Every option a config or the command line can set, with the TOML type it takes. A test pins that these are
# exactly the fields of DecodeOptions and EncodeOptions, so a new option cannot be forgotten here.
DECODE_KEYS = {"vae": str, "dtype": str, "device": str, "chunk": int, "buffers": int, "sync": bool,
               "denormalize": bool, "exact": bool, "fast": bool, "engine": bool, "decode_timestep": float,
               "decode_noise_scale": float, "bands": int, "max_vram": str, "band_caches": str}
ENCODE_KEYS = {"codec": str, "crf": int, "preset": str, "pix_fmt": str, "fps": float, "pad": bool, "audio": str,
               "cut_audio": bool, "metadata": dict, "no_metadata": bool, "encoders": int | str}
OPTION_KEYS = DECODE_KEYS | ENCODE_KEYS
PATH_KEYS = ("latents", "output", "inputs", "output_dir", "suffix")
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
               dict: "a table such as { artist = \"me\" }", int | str: 'a number or "auto"'}


@dataclass(kw_only=True, slots=True)
class JobSpec:
    """One latents file to one output, with every option resolved."""

    index: int
    """Position in the expanded job list: stable, and what sharding splits on."""
    name: str
    """Where it came from, for messages: `jobs[3]`, or `jobs[3] (a.pt)` for a file matched by `inputs`."""
    latents: Path
    output: Path
    decode: DecodeOptions
    encode: EncodeOptions


@dataclass(kw_only=True, slots=True)
class BatchConfig:
    path: Path
    jobs: list[JobSpec]


class ConfigError(BadInput):
    """A config with problems (exit code 2); `problems` lists each one with its TOML path."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        n = len(problems)
        super().__init__(f"{n} problem{'s' if n > 1 else ''} in {path}:\n" + "\n".join(f"  {p}" for p in problems))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, *,
                allow_outside: bool = False) -> BatchConfig:
    """Read and check `path`; `overrides` holds the options given on the command line (only those given);
    `allow_outside` lets jobs write outside the config's folder.

    Raises ConfigError listing every problem; nothing is read but the config and the file system's names."""
    path = regular_file(path, "config file", "pass a batch config (a .toml file)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"could not read config {str(path)!r}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path} is not valid TOML: {e}") from None
    return _Checker(path, allow_outside).check(data, overrides or {})


class _Checker:
    def __init__(self, path: Path, allow_outside: bool = False):
        self.path = path
        self.allow_outside = allow_outside
        self.base = Path(os.path.abspath(path.parent))
        self.problems: list[str] = []
        self.bad_shared: set[str] = set()  # options with an invalid value in [defaults] or on the command line

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def check(self, data: dict, overrides: dict[str, Any]) -> BatchConfig:
        for key in data:
            if key not in ("defaults", "jobs"):
                self.problem(f"{key} is not a section of a batch config{_suggest(key, ('defaults', 'jobs'))}:"
                             " use [defaults] and [[jobs]]")
        cli = self.options(overrides, "command line")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            self.problem("defaults must be a table: [defaults]")
            defaults = {}
        for key in defaults:
            if key in PATH_KEYS:
                self.problem(f"defaults.{key} belongs in a [[jobs]] entry, not in [defaults]")
            elif key not in OPTION_KEYS:
                self.problem(f"defaults.{key} is not an option{_suggest(key, OPTION_KEYS)}")
        base = self.options({k: v for k, v in defaults.items() if k in OPTION_KEYS}, "defaults")
        entries = data.get("jobs")
        if entries is None or entries == []:
            self.problem("no jobs: add [[jobs]] entries with latents and output (or inputs and output_dir)")
            entries = []
        elif not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            self.problem("jobs must be an array of tables: write each job as [[jobs]]")
            entries = []
        jobs: list[JobSpec] = []
        for i, entry in enumerate(entries):
            jobs += self.job(i, entry, base, cli, start=len(jobs))
        seen: dict[Path, str] = {}
        for job in jobs:
            if job.output in seen:
                self.problem(f"{job.name}: output {str(job.output)!r} is also the output of {seen[job.output]}:"
                             " give each job its own output")
            seen.setdefault(job.output, job.name)
        if self.problems:
            raise ConfigError(self.path, self.problems)
        return BatchConfig(path=self.path, jobs=jobs)

    def options(self, values: dict[str, Any], where: str) -> dict[str, tuple[Any, str]]:
        """The valid values of `values`, each with where it was set; a problem for each invalid one."""
        valid = {}
        for key, value in values.items():
            label = f"--{key.replace('_', '-')}" if where == "command line" else f"{where}.{key}"
            message = _check_option(key, value)
            if message is None:
                valid[key] = (float(value) if OPTION_KEYS[key] is float else value, label)
            else:
                self.problem(f"{label} {message}")
                if where in ("defaults", "command line"):
                    self.bad_shared.add(key)
        return valid

    def job(self, i: int, entry: dict, base: dict, cli: dict, *, start: int) -> list[JobSpec]:
        where = f"jobs[{i}]"
        for key in entry:
            if key not in OPTION_KEYS and key not in PATH_KEYS:
                self.problem(f"{where}.{key} is not a job key{_suggest(key, (*PATH_KEYS, *OPTION_KEYS))}")
        own = self.options({k: v for k, v in entry.items() if k in OPTION_KEYS}, where)
        for key in PATH_KEYS:
            if key in entry and not (isinstance(entry[key], str) and entry[key]):
                self.problem(f"{where}.{key} must be a non-empty string, got {entry[key]!r}")
        pairs = self.paths(where, entry)
        if not pairs:
            return []
        merged = {**base, **own, **cli}
        values = {k: v for k, (v, _) in merged.items()}
        tables = [level["metadata"][0] for level in (base, own, cli) if "metadata" in level]
        if tables:  # tags add up, key by key
            values["metadata"] = {k: v for table in tables for k, v in table.items()}
        if "audio" in merged:  # relative to the config (the command line's is absolute already)
            values["audio"] = str(self.resolve(values["audio"]))
            why = not_regular(Path(values["audio"]))
            if why:
                self.problem(f"{merged['audio'][1]} {values['audio']!r} {why}")
        decode = DecodeOptions(**{k: v for k, v in values.items() if k in DECODE_KEYS})
        try:
            encode = EncodeOptions(**{k: v for k, v in values.items() if k in ENCODE_KEYS})
        except BadInput as e:  # fields valid one by one that do not go together
            self.problem(f"{where}: {e}")
            return []
        bad = self.bad_shared | {k for k in entry if k in OPTION_KEYS and k not in own}
        if not bad & ENCODE_KEYS.keys():
            # Checks across fields only when each field is valid, so one mistake gives one message.
            self.encoding(where, pairs[0][1], encode, merged)
        named = "inputs" in entry
        return [JobSpec(index=start + n, name=f"{where} ({latents.name})" if named else where, latents=latents,
                        output=output, decode=decode, encode=encode) for n, (latents, output) in enumerate(pairs)]

    def paths(self, where: str, entry: dict) -> list[tuple[Path, Path]]:
        single, pattern = {"latents", "output"} & entry.keys(), {"inputs", "output_dir"} & entry.keys()
        if single and pattern:
            self.problem(f"{where} mixes latents/output with inputs/output_dir: give one pair or the other")
            return []
        if "suffix" in entry and not pattern:
            self.problem(f"{where}.suffix goes with inputs and output_dir; output already names the file")
        if pattern:
            for key in ("inputs", "output_dir"):
                if key not in entry:
                    self.problem(f"{where} has {({'inputs', 'output_dir'} - {key}).pop()} but no {key}")
            if len(pattern) < 2 or not all(isinstance(entry[k], str) and entry[k] for k in pattern):
                return []
            return self.expand(where, entry["inputs"], entry["output_dir"], entry.get("suffix", ".mp4"))
        for key in ("latents", "output"):
            if key not in entry:
                self.problem(f"{where} has no {key}: give latents and output, or inputs and output_dir")
        if len(single) < 2 or not all(isinstance(entry[k], str) and entry[k] for k in single):
            return []
        latents = self.resolve(entry["latents"])
        if not all([self.inside(f"{where}.output", entry["output"]), self.latents_ok(f"{where}.latents", latents)]):
            return []
        return [(latents, self.resolve(entry["output"]))]

    def expand(self, where: str, pattern: str, output_dir: str, suffix: str) -> list[tuple[Path, Path]]:
        # A suffix ends a file name in output_dir: no folders in it, so no job writes outside output_dir.
        if not isinstance(suffix, str) or not suffix.startswith(".") or any(c in suffix for c in "/\\\0"):
            self.problem(f"{where}.suffix must be the end of a file name, a dot and no folders, such as \".mp4\","
                         f" got {suffix!r}")
            return []
        if not self.inside(f"{where}.output_dir", output_dir):
            return []
        matches = sorted(Path(p) for p in glob.glob(str(self.resolve(pattern)), recursive=True))
        matches = [p for p in matches if p.is_file()]
        if not matches:
            self.problem(f"{where}.inputs {pattern!r} matches no files (looked in {self.base})")
            return []
        if not all([self.latents_ok(f"{where}.inputs", p) for p in matches]):
            return []
        out_dir = self.resolve(output_dir)
        return [(p, out_dir / f"{p.stem}{suffix}") for p in matches]

    def inside(self, label: str, value: str) -> bool:
        """Whether a job's output may go where `value` says: under the config's folder, unless --allow-outside."""
        if self.allow_outside:
            return True
        # (resolved: a symlink inside the folder that points out of it is outside too)
        if Path(value).expanduser().is_absolute() or not self.resolve(value).resolve().is_relative_to(
                self.base.resolve()):
            self.problem(f"{label} {value!r} is outside the config's folder ({self.base}): a config writes under its"
                         " own folder unless you pass --allow-outside")
            return False
        return True

    def latents_ok(self, label: str, path: Path) -> bool:
        if path.suffix.lower() not in SUFFIXES:
            self.problem(f"{label} {str(path)!r} is not a latents file: use .pt, .safetensors, .npy or .latent")
            return False
        why = not_regular(path)
        if why:
            self.problem(f"{label} {str(path)!r} {why}")
            return False
        return True

    def encoding(self, where: str, output: Path, encode: EncodeOptions, merged: dict) -> None:
        """Checks across fields: codec against container, pix_fmt against codec, crf against the codec's range."""
        crf, crf_from = encode.crf, merged.get("crf", (None, "built-in"))[1]
        try:
            # crf=0 here: its range depends on the codec, which plan_encode resolves; checked below with its path.
            plan = plan_encode(output, width=16, height=16, fps=16.0, options=replace(encode, crf=0))
        except BadInput as e:
            self.problem(f"{where}: {e}")
            return
        if encode.metadata and not encode.no_metadata and plan.codec != "png":
            try:
                check_given_tags(output.suffix.lower(), encode.metadata)
            except BadInput as e:
                self.problem(f"{where}: {e}")
        try:
            check_crf(crf, plan.codec, "" if crf_from == f"{where}.crf" else f" (set by {crf_from})")
        except BadInput as e:
            self.problem(f"{where}.{e}")

    def resolve(self, value: str) -> Path:
        return Path(os.path.abspath(self.base / Path(value).expanduser()))


def _check_option(key: str, value: Any) -> str | None:
    """None if `value` is valid for option `key`, else what is wrong (after the key: `must be in 1..64, got 0`)."""
    kind = OPTION_KEYS[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        return f"must be {_TYPE_NAMES[kind]}, got {value!r}"
    # The option dataclasses validate one field at a time when given only that field.
    cls = DecodeOptions if key in DECODE_KEYS else EncodeOptions
    try:
        cls(**{key: value})
    except BadInput as e:
        message = str(e)
        return message.removeprefix(key).lstrip() if message.startswith(key) else f"is invalid: {message}"
    return None


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f": did you mean {close[0]}?" if close else ""
