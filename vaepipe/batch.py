"""Batch runs: many latents files to many videos through one Session, the GPU kept busy from first job to last.

    prefetch thread   check job i+1 against the manifest (skip if done), read + check its latents, pin them
    main thread       prepare job i, decode it through the lanes (its frames go into ffmpeg)
    finish thread     wait for job i-1's ffmpeg to flush, publish, hash, write its manifest record

A failed job is recorded and skipped; the manifest (JSON Lines, last record per output wins) lets a re-run skip
what is done. Scale-out is torch.distributed's: under torchrun each rank takes jobs index % WORLD_SIZE == RANK
and writes its own manifest part, which rank 0 merges at the end; `--shard I/N` takes the same share without it.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from rich.markup import escape
from rich.progress import ProgressColumn, Task
from rich.text import Text

from . import __version__
from .config import DECODE_KEYS, ENCODE_KEYS, BatchConfig, JobSpec
from .encode import output_sha256
from .errors import BadInput, VaepipeError
from .files import not_regular
from .latents import Latents, read_latents
from .pipeline import LANES, Buffers
from .progress import Reporter
from .runner import Session, Streamed, summarize
from .vae import DTYPES

# Options that change the output's bytes: a done record made with others is not this job's output.
_OUTPUT_KEYS = ("vae", "dtype", "denormalize", "exact", "decode_timestep", "decode_noise_scale", *ENCODE_KEYS)


@dataclass(kw_only=True, slots=True)
class BatchOptions:
    shard: tuple[int, int] | None = None
    """Take share I of N without torch.distributed."""
    overwrite: bool = False
    """Redo jobs the manifest says are done."""
    manifest: Path | None = None
    """The manifest; None: CONFIG_STEM.manifest.jsonl beside the config."""


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard must be I/N such as 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInput(f"--shard {text}: I must be in 0..N-1 and N at least 1, such as 0/4 … 3/4")
    return i, n


@dataclass(frozen=True, slots=True)
class World:
    """Which share of the jobs this process takes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    how: str = "single"
    """single, shard (--shard I/N) or torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""

    @classmethod
    def detect(cls, shard: tuple[int, int] | None = None) -> World:
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
            if shard:
                raise BadInput("--shard is for runs without torchrun; under torchrun each rank takes its share of"
                               " the jobs from RANK and WORLD_SIZE: drop --shard")
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            if not 0 <= rank < size:
                raise BadInput(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={size})")
            return cls(rank=rank, size=size, local_rank=int(env.get("LOCAL_RANK", 0)), how="torchrun")
        if shard and shard[1] > 1:
            return cls(rank=shard[0], size=shard[1], how="shard")
        return cls()

    def take(self, jobs: list[JobSpec]) -> list[JobSpec]:
        """A deterministic, disjoint share: job index modulo the world size, in the config's order."""
        return [job for job in jobs if job.index % self.size == self.rank]

    @property
    def part(self) -> str | None:
        """The manifest part this process writes (None: the manifest itself)."""
        if self.how == "single":
            return None
        return f"{'rank' if self.how == 'torchrun' else 'shard'}{self.rank}-of-{self.size}"


def manifest_path(config: BatchConfig, options: BatchOptions) -> Path:
    if options.manifest is not None:
        return Path(os.path.abspath(options.manifest))
    return Path(os.path.abspath(config.path.with_name(f"{config.path.stem}.manifest.jsonl")))


class Manifest:
    """JSON Lines, one record per job event (running, then done, failed or interrupted); for each output the
    newest record counts. Each process appends to its own file: the manifest, or a part beside it."""

    def __init__(self, path: Path, part: str | None = None):
        self.path = path
        self.target = path if part is None else path.with_name(f"{path.stem}.{part}{path.suffix}")
        self._lock = threading.Lock()
        self._file = None
        self._closed = False

    def parts(self) -> list[Path]:
        stem = glob.escape(self.path.stem)
        found = {*self.path.parent.glob(f"{stem}.rank*-of-*{self.path.suffix}"),
                 *self.path.parent.glob(f"{stem}.shard*-of-*{self.path.suffix}")}
        return sorted(found)

    def latest(self) -> dict[str, dict]:
        """The newest record of each output, from the manifest and every part (lines torn by a crash are ignored;
        a file that is not a manifest at all is bad input, never appended to)."""
        latest: dict[str, dict] = {}
        for path in (self.path, *self.parts()):
            for record in _records(path):
                old = latest.get(record["output"])
                if old is None or record.get("time", 0) >= old.get("time", 0):
                    latest[record["output"]] = record
        return latest

    def open(self) -> None:
        """Open the file this process appends to (before any job, so that an unwritable one is bad input)."""
        with self._lock:
            if self._file is None and not self._closed:
                try:
                    self.target.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.target, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
                except OSError as e:
                    raise BadInput(f"cannot write the manifest {str(self.target)!r} ({e.strerror}): pass --manifest"
                                   " with a path in a writable folder") from None

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        self.open()
        with self._lock:
            if self._closed:
                return
            self._file.write(line)
            self._file.flush()
            if record.get("status") != "running":
                os.fsync(self._file.fileno())  # a done record must survive a crash right after it

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def merge(self) -> None:
        """Fold every part into the manifest (newest record per output, in job order) and delete the parts."""
        parts = self.parts()
        records = sorted(self.latest().values(), key=lambda r: (r.get("index", 1 << 62), r["output"]))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        for part in parts:
            part.unlink(missing_ok=True)


def _records(path: Path) -> list[dict]:
    """The records in one manifest file (none if it does not exist). Lines torn by a crash (cut short, NUL-filled)
    are skipped; a file with complete lines none of which is a record, or that is not UTF-8 text, is not ours."""
    fix = "pass --manifest with another path, or move the file away to start a new manifest (done jobs then run again)"
    why = not_regular(path)
    if why == "does not exist":
        return []
    if why and path.is_dir():
        raise BadInput(f"the manifest {str(path)!r} is a folder: pass --manifest with a file path, such as"
                       f" {str(path / 'batch.manifest.jsonl')!r}")
    if why:  # a FIFO would block the read (and the append), a device never end
        raise BadInput(f"the manifest {str(path)!r} {why}: pass --manifest with the path of a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise BadInput(f"cannot read the manifest {str(path)!r} ({e.strerror}): {fix}") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"the manifest {str(path)!r} is not a vaepipe manifest (not UTF-8 text, byte {e.start}):"
                       f" {fix}") from None
    records, complete = [], 0
    for line in text.splitlines(keepends=True):
        complete += line.endswith("\n") and bool(line.strip("\0 \t\r\n"))
        try:
            record = json.loads(line.strip("\0"))
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("output"), str):
            records.append(record)
    if complete and not records:
        raise BadInput(f"the manifest {str(path)!r} is not a vaepipe manifest (no line of it is a job record): {fix}")
    return records


def settings(spec: JobSpec) -> dict:
    """The options that decide the output's bytes, as recorded in the manifest."""
    values = {k: getattr(spec.decode, k) for k in DECODE_KEYS} | {k: getattr(spec.encode, k) for k in ENCODE_KEYS}
    if values["dtype"] is None:  # the default depends on the device: record what it resolves to
        dtype = spec.decode.torch_dtype(spec.decode.torch_device())
        values["dtype"] = next(name for name, d in DTYPES.items() if d == dtype)
    return {k: values[k] for k in _OUTPUT_KEYS}


def is_done(spec: JobSpec, record: dict | None) -> bool:
    """The manifest says done for this input and these settings, and every output is there with its hash."""
    if not record or record.get("status") != "done" or record.get("latents") != str(spec.latents):
        return False
    if record.get("settings") != settings(spec) or not record.get("files"):
        return False
    return all(output_sha256(Path(f["path"])) == f.get("sha256") for f in record["files"])


@dataclass(slots=True)
class _Fetched:
    skip: bool = False
    latents: Latents | None = None
    error: str | None = None
    read_s: float = 0.0


@dataclass(slots=True)
class _Counts:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: int = 0
    frames: int = 0
    decode_busy_s: float = 0.0
    first_job: dict | None = None
    """The first job that ran: its wall time and decode lane carry the start-up (imports, first calls, buffers)."""
    results: list[dict] = field(default_factory=list)


class _DetailColumn(ProgressColumn):
    """The batch row's counts and ETA (empty on the lane rows)."""

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("detail", ""), style="progress.remaining")


class BatchRun:
    """One process's share of a batch: prefetch, decode, finish, record."""

    def __init__(self, config: BatchConfig, options: BatchOptions, reporter: Reporter, world: World):
        self.config, self.options, self.reporter, self.world = config, options, reporter, world
        self.jobs = world.take(config.jobs)
        self.manifest = Manifest(manifest_path(config, options), world.part)
        self.session = Session(reporter)
        self.counts = _Counts()
        self.interrupted = False
        self._lock = threading.Lock()
        self._pending: list[Streamed] = []  # handed to the finish thread, not finished yet
        self._records: dict[str, dict] = {}
        self._row = None
        self._first_job: str | None = None
        self._steady_from: tuple[float, float] | None = None  # the second job's start, the model load by then

    # -- the run -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._records = self.manifest.latest()
        self.manifest.open()
        self._start_row()
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="vaepipe-prefetch")
        finisher = ThreadPoolExecutor(1, thread_name_prefix="vaepipe-finish")
        completions: list[Future] = []
        t0 = time.perf_counter()
        try:
            ahead = prefetch.submit(self._fetch, self.jobs[0]) if self.jobs else None
            for i, spec in enumerate(self.jobs):
                fetched = ahead.result()
                if i + 1 < len(self.jobs):
                    ahead = prefetch.submit(self._fetch, self.jobs[i + 1])  # reads while this job decodes
                if fetched.skip:
                    self._skipped(spec)
                elif fetched.error:
                    self._record(spec, "failed", error=fetched.error)
                else:
                    completions.append(self._run_job(spec, fetched, finisher))
            for c in completions:
                c.result()
            end = time.perf_counter()
        except KeyboardInterrupt:
            self.interrupted = True
            try:  # the jobs whose frames are all in ffmpeg: let them finish (a second Ctrl-C stops at once)
                for c in completions:
                    c.result()
            except KeyboardInterrupt:
                with self._lock:
                    pending = list(self._pending)
                for streamed in pending:
                    streamed.abort()
            raise
        finally:
            prefetch.shutdown(wait=False, cancel_futures=True)
            finisher.shutdown(wait=not self.interrupted)
            self.manifest.close()
        return self._summary(end - t0, end)

    def _fetch(self, spec: JobSpec) -> _Fetched:
        """On the prefetch thread: skip if done, else read and check the latents into (pinned) host memory."""
        if not self.options.overwrite and is_done(spec, self._records.get(str(spec.output))):
            return _Fetched(skip=True)
        t = time.perf_counter()
        try:
            latents = read_latents(spec.latents)
            if torch.cuda.is_available() and spec.decode.device != "cpu":
                latents.tensor = latents.tensor.pin_memory()  # the copy to the GPU then runs at full speed
        except VaepipeError as e:
            return _Fetched(error=str(e))
        except Exception as e:  # noqa: BLE001 - a bad job is recorded and skipped, whatever went wrong
            return _Fetched(error=f"{type(e).__name__}: {e}")
        return _Fetched(latents=latents, read_s=time.perf_counter() - t)

    def _run_job(self, spec: JobSpec, fetched: _Fetched, finisher: ThreadPoolExecutor) -> Future:
        self._record(spec, "running")
        t = time.perf_counter()
        if self._first_job is None:
            self._first_job = spec.name
        elif self._steady_from is None:  # from here on the lanes run warm: the steady state
            self._steady_from = (t, self.session.load_s)
        samples: list[Future] = []
        error = None
        loaded = self.session.load_s
        try:
            job = self.session.prepare(fetched.latents, spec.output, self._decode_options(spec), spec.encode)
            for streamed in self.session.stream(job):
                try:
                    with self._lock:
                        self._pending.append(streamed)
                    samples.append(finisher.submit(self._finish_sample, streamed, job))
                except BaseException:
                    streamed.abort()
                    raise
        except KeyboardInterrupt:
            self._record(spec, "interrupted", error="interrupted", started=t)
            raise
        except Exception as e:  # noqa: BLE001 - a bad job is recorded and skipped, whatever went wrong
            error = str(e) if isinstance(e, VaepipeError) else f"{type(e).__name__}: {e}"
            del e
            self._free()
        # The VAE's load (in the first job that uses it) is reported apart from the job's wall time.
        load_s = self.session.load_s - loaded
        # After the samples on the one finish thread, so their results are in when it runs.
        return finisher.submit(self._complete, spec, samples, error, t + load_s, fetched.read_s, load_s)

    def _finish_sample(self, streamed: Streamed, job) -> dict:
        try:
            stats, size = streamed.finish()
        finally:
            with self._lock:
                self._pending.remove(streamed)
        out = summarize(job, streamed.plan, stats, size)
        out["sha256"] = output_sha256(streamed.plan.dest)
        return out

    def _complete(self, spec: JobSpec, samples: list[Future], error: str | None, started: float,
                  read_s: float, load_s: float) -> None:
        outputs = []
        for sample in samples:
            try:
                outputs.append(sample.result())
            except Exception as e:  # noqa: BLE001 - recorded as the job's error
                error = error or (str(e) if isinstance(e, VaepipeError) else f"{type(e).__name__}: {e}")
        if error is None:
            self._record(spec, "done", outputs=outputs, started=started, read_s=read_s, load_s=load_s)
        else:
            self._record(spec, "interrupted" if self.interrupted else "failed", error=error, outputs=outputs,
                         started=started, read_s=read_s, load_s=load_s)

    def _free(self) -> None:
        """After a failure (an OOM above all): drop what the job held, so the next one starts clean."""
        self.session.buffers = Buffers()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _decode_options(self, spec: JobSpec):
        # Under torchrun, "cuda" (or no device) means this rank's GPU.
        if self.world.how == "torchrun" and spec.decode.device in (None, "cuda") and torch.cuda.is_available():
            return replace(spec.decode, device=f"cuda:{self.world.local_rank}")
        return spec.decode

    # -- records and progress --------------------------------------------------------------------------------
    def _record(self, spec: JobSpec, status: str, *, error: str | None = None, outputs: list[dict] | None = None,
                started: float | None = None, read_s: float = 0.0, load_s: float = 0.0) -> None:
        outputs = outputs or []
        busy = {lane: round(sum(o["busy_s"][lane] for o in outputs), 4) for lane in LANES}
        record = {
            "job": spec.name, "index": spec.index, "latents": str(spec.latents), "output": str(spec.output),
            "status": status, "error": error, "frames": sum(o["frames"] for o in outputs),
            "files": [{"path": o["output"], "bytes": o["bytes"], "sha256": o["sha256"], "frames": o["frames"]}
                      for o in outputs],
            "bytes": sum(o["bytes"] for o in outputs),
            "sha256": outputs[0]["sha256"] if len(outputs) == 1 else None,
            "timings": {"read_s": round(read_s, 4), "load_s": round(load_s, 4),
                        "wall_s": round(time.perf_counter() - started, 4) if started else None, "busy_s": busy},
            "settings": settings(spec), "rank": self.world.rank, "world_size": self.world.size,
            "host": os.uname().nodename, "pid": os.getpid(), "time": time.time(), "vaepipe": __version__,
        }
        self.manifest.write(record)
        if status == "running":
            return
        with self._lock:
            c = self.counts
            c.results.append({k: record[k] for k in ("job", "index", "latents", "output", "status", "error",
                                                     "frames", "bytes", "sha256", "timings")})
            if spec.name == self._first_job and c.first_job is None:
                c.first_job = {"job": spec.name, "status": status, "wall_s": record["timings"]["wall_s"],
                               "decode_busy_s": busy["decode"]}
            if status == "done":
                c.done += 1
                c.frames += record["frames"]
                c.decode_busy_s += busy["decode"]
            else:
                setattr(c, status, getattr(c, status) + 1)
        if status == "done":
            replaced = "; replaced the file that was there" if any(o.get("replaced") for o in outputs) else ""
            self.reporter.log(f"[green]done[/] {escape(spec.name)} → {escape(str(spec.output))}"
                              f" ({record['frames']} frames, {record['timings']['wall_s']:.2f} s{replaced})",
                              markup=True)
        elif status == "failed":
            self._error(f"failed {spec.name} ({spec.latents}): {error}")
        self._update_row()

    def _skipped(self, spec: JobSpec) -> None:
        with self._lock:
            self.counts.skipped += 1
            self.counts.results.append({"job": spec.name, "index": spec.index, "latents": str(spec.latents),
                                        "output": str(spec.output), "status": "skipped", "error": None})
        self.reporter.log(f"[dim]skip {escape(spec.name)}: {escape(str(spec.output))} is done (manifest and SHA-256"
                          " agree)[/]", markup=True)
        self._update_row()

    def _error(self, message: str) -> None:
        """Failures are errors: shown even with --quiet."""
        from rich.console import Console

        console = self.reporter.progress.console if not self.reporter.quiet else Console(stderr=True)
        console.print(message, style="red", highlight=False, markup=False)

    def _start_row(self) -> None:
        self._t_first = time.perf_counter()
        if self.reporter.quiet:
            return
        progress = self.reporter.progress
        if not any(isinstance(c, _DetailColumn) for c in progress.columns):
            progress.columns = (*progress.columns, _DetailColumn())
        self._row = progress.add_task("batch", total=len(self.jobs), unit="jobs/s", detail="", rated=0)
        self._update_row()

    def _update_row(self) -> None:
        if self._row is None:
            return
        c = self.counts
        finished = c.done + c.failed + c.skipped + c.interrupted
        detail = f"{c.done} done · {c.failed} failed · {c.skipped} skipped"
        processed = c.done + c.failed
        if processed and finished < len(self.jobs):
            eta = (time.perf_counter() - self._t_first) / processed * (len(self.jobs) - finished)
            detail += f" · ETA {timedelta(seconds=round(eta))}"
        # The rate counts jobs that ran: skipping a done job takes a hash, not a decode.
        self.reporter.progress.update(self._row, completed=finished, detail=detail, rated=processed)
        self.reporter.tick(force=finished == len(self.jobs))

    def _summary(self, wall_s: float, end: float) -> dict:
        c = self.counts
        after_load = max(wall_s - self.session.load_s, 0.0)
        nothing = c.done + c.failed + c.interrupted == 0  # every job skipped as done, or none in this share
        after_first = None
        if self._steady_from is not None:
            start, loaded = self._steady_from
            window = max(end - start - (self.session.load_s - loaded), 0.0)
            first = c.first_job or {}
            busy = c.decode_busy_s - (first["decode_busy_s"] if first.get("status") == "done" else 0.0)
            after_first = {"wall_s": round(window, 4), "decode_busy_s": round(busy, 4),
                           "decode_busy_ratio": round(busy / window, 4) if window else None}
        return {
            "config": str(self.config.path), "manifest": str(self.manifest.path),
            "manifest_part": str(self.manifest.target) if self.world.part else None,
            "rank": self.world.rank, "world_size": self.world.size, "mode": self.world.how,
            "jobs": {"total": len(self.jobs), "done": c.done, "failed": c.failed, "skipped": c.skipped,
                     "interrupted": c.interrupted},
            "frames": c.frames, "load_s": round(self.session.load_s, 4), "wall_s": round(wall_s, 4),
            "wall_after_load_s": round(after_load, 4), "decode_busy_s": round(c.decode_busy_s, 4),
            "decode_busy_ratio": round(c.decode_busy_s / after_load, 4) if after_load and not nothing else None,
            "nothing_to_do": nothing, "first_job": c.first_job, "after_first_job": after_first,
            "results": sorted(c.results, key=lambda r: r["index"]), "vaepipe": __version__,
        }


RETIRED = frozenset({"fast"})
"""Old option names still read (with a notice) but changing nothing: not shown as a job's settings."""


def dry_run(config: BatchConfig, options: BatchOptions, world: World) -> dict:
    """The resolved job list of this process's share, each marked run or skip; nothing is read but hashes."""
    manifest = Manifest(manifest_path(config, options), world.part)
    records = manifest.latest()
    jobs = []
    for spec in world.take(config.jobs):
        done = not options.overwrite and is_done(spec, records.get(str(spec.output)))
        jobs.append({"job": spec.name, "index": spec.index, "latents": str(spec.latents), "output": str(spec.output),
                     "action": "skip (done)" if done else "run",
                     "options": {k: v for k, v in asdict(spec.decode).items() if v is not None and k not in RETIRED}
                     | {k: v for k, v in asdict(spec.encode).items() if v is not None}})
    return {"config": str(config.path), "manifest": str(manifest.path), "rank": world.rank,
            "world_size": world.size, "mode": world.how, "total_jobs": len(config.jobs), "jobs": jobs}


def run(config: BatchConfig, options: BatchOptions, reporter: Reporter, show: Callable[[dict], None]) -> dict:
    """Run this process's share; under torch.distributed, gather every rank's summary and merge the manifest on
    rank 0. Returns the summary (the whole batch's when gathered: `jobs.failed` counts every rank's); `show` gets
    it once, on rank 0 of a gathered run before the last barrier (a rank that exits early with code 1 makes
    torchrun tear the others down, so rank 0 must be done printing by then)."""
    world = World.detect(options.shard)
    if world.how == "torchrun" and world.local_rank != 0:
        reporter = Reporter(quiet=True)  # one set of bars per host; failures still print
    created = _init_group(world)
    try:
        with reporter:
            summary = BatchRun(config, options, reporter, world).run()
        if _group_ready():
            summary = _gather(summary, Manifest(manifest_path(config, options)), show)
        else:
            if world.how == "single":
                manifest = Manifest(manifest_path(config, options))
                if manifest.parts():
                    manifest.merge()  # parts left by earlier sharded or torchrun runs
            show(summary)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return summary


def _init_group(world: World) -> bool:
    """Join torchrun's process group (gloo: it only carries the end-of-batch gather and barrier). True if made
    here. The timeout is long: a rank whose share is done waits at the end for the slowest."""
    if world.how != "torchrun" or not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT")):
        return False
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    hours = float(os.environ.get("VAEPIPE_DIST_TIMEOUT_H", 72))
    dist.init_process_group("gloo", timeout=timedelta(hours=hours))
    return True


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(summary: dict, manifest: Manifest, show: Callable[[dict], None]) -> dict:
    import torch.distributed as dist

    summaries: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)  # also the barrier: every rank has closed its manifest part
    if dist.get_rank() == 0:
        manifest.merge()
    merged = combine(summaries)
    merged["rank"] = dist.get_rank()
    if dist.get_rank() == 0:
        show(merged)
    dist.barrier()  # nobody exits (and so nobody is torn down by torchrun) before rank 0 has merged and printed
    return merged


def combine(summaries: list[dict]) -> dict:
    """One summary of several ranks' (or shards') summaries."""
    jobs = {k: sum(s["jobs"][k] for s in summaries) for k in summaries[0]["jobs"]}
    busy = sum(s["decode_busy_s"] for s in summaries)
    after_load = sum(s["wall_after_load_s"] for s in summaries)
    first = summaries[0]
    return {
        "config": first["config"], "manifest": first["manifest"], "manifest_part": None, "rank": 0,
        "world_size": first["world_size"], "mode": first["mode"], "jobs": jobs,
        "frames": sum(s["frames"] for s in summaries), "load_s": round(max(s["load_s"] for s in summaries), 4),
        "wall_s": round(max(s["wall_s"] for s in summaries), 4),
        "wall_after_load_s": round(max(s["wall_after_load_s"] for s in summaries), 4),
        "decode_busy_s": round(busy, 4), "decode_busy_ratio": round(busy / after_load, 4) if after_load else None,
        "nothing_to_do": all(s.get("nothing_to_do", False) for s in summaries), "first_job": None,
        "after_first_job": _combined_after_first([s.get("after_first_job") for s in summaries]),
        "ranks": [{k: v for k, v in s.items() if k != "results"} for s in summaries],
        "results": sorted((r for s in summaries for r in s["results"]), key=lambda r: r["index"]),
        "vaepipe": first["vaepipe"],
    }


def _combined_after_first(parts: list[dict | None]) -> dict | None:
    """The ranks' steady states together (each rank's first job is in `ranks`)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    wall, busy = sum(p["wall_s"] for p in parts), sum(p["decode_busy_s"] for p in parts)
    return {"wall_s": round(max(p["wall_s"] for p in parts), 4), "decode_busy_s": round(busy, 4),
            "decode_busy_ratio": round(busy / wall, 4) if wall else None}


def launch(nproc: int, worker_args: list[str]) -> int:
    """Start `nproc` workers of `vaepipe batch` on this host through torchrun's launcher (one GPU each); return
    the exit code (the workers agree on it: 1 if any job failed anywhere)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"vaepipe-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    with contextlib.redirect_stdout(sys.stderr):  # the launcher's chatter is not the --json summary
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "vaepipe", "batch", *worker_args)
        except ChildFailedError as e:
            codes = [f.exitcode for f in e.failures.values()]
            return max((c for c in codes if c and c > 0), default=1)
    return 0
