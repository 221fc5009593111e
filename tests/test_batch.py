"""Batch runs: bad jobs fail alone, outputs equal single decodes, resume after a kill, disjoint complete shares."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vaepipe import runner as runner_module
from vaepipe.batch import Manifest, World, combine
from vaepipe.cli import app
from vaepipe.config import OPTION_KEYS, JobSpec, load_config
from vaepipe.encode import EncodeOptions
from vaepipe.runner import DecodeOptions

from conftest import ffmpeg_processes_under, read_video, start_vaepipe, write_latents

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 3, 3, 5)  # 9 frames of 40x24: a fraction of a second per job on two CPU cores


def make_batch(folder: Path, n: int, *, bad: set[int] = frozenset(), extra: str = "", shape=SHAPE) -> Path:
    """`n` jobs lat/clipI.pt -> out/clipI.mp4 (those in `bad` hold NaN latents)."""
    (folder / "lat").mkdir(exist_ok=True)
    for i in range(n):
        z = write_latents(folder / "lat" / f"clip{i}.pt", shape, seed=i)
        if i in bad:
            z[0, 1, 2, 3] = float("nan")
            torch.save(z, folder / "lat" / f"clip{i}.pt")
    jobs = "".join(f'[[jobs]]\nlatents = "lat/clip{i}.pt"\noutput = "out/clip{i}.mp4"\n' for i in range(n))
    path = folder / "batch.toml"
    path.write_text(f'[defaults]\nvae = "random:wan2.1-tiny"\ndevice = "cpu"\npreset = "veryfast"\n{extra}\n{jobs}')
    return path


def batch(*args: str) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(app, ["batch", *args, "--json"])
    try:
        summary = json.loads(result.stdout)
    except ValueError:
        summary = None
    return result.exit_code, summary, result.output


def statuses(summary: dict) -> dict[str, str]:
    return {Path(r["output"]).name: r["status"] for r in summary["results"]}


def latest(path: Path) -> dict[str, dict]:
    return {Path(k).name: v for k, v in Manifest(path.with_name("batch.manifest.jsonl")).latest().items()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.part")]


@pytest.mark.slow
def test_a_bad_job_fails_alone_and_good_outputs_equal_single_decodes(tmp_path):
    path = make_batch(tmp_path, 3, bad={1})
    code, summary, output = batch(str(path))
    assert code == 1, output
    assert statuses(summary) == {"clip0.mp4": "done", "clip1.mp4": "failed", "clip2.mp4": "done"}
    assert summary["jobs"] == {"total": 3, "done": 2, "failed": 1, "skipped": 0, "interrupted": 0}
    assert "NaN" in output and "clip1.pt" in output
    for i in (0, 2):
        ref = tmp_path / f"ref{i}.mp4"
        result = CliRunner().invoke(app, ["decode", str(tmp_path / "lat" / f"clip{i}.pt"), str(ref),
                                          "--vae", "random:wan2.1-tiny", "--device", "cpu", "--preset", "veryfast"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "out" / f"clip{i}.mp4").read_bytes() == ref.read_bytes()
    assert not (tmp_path / "out" / "clip1.mp4").exists() and leftovers(tmp_path) == []
    records = latest(path)
    assert records["clip1.mp4"]["status"] == "failed" and "NaN or Inf" in records["clip1.mp4"]["error"]
    done = records["clip0.mp4"]
    assert done["frames"] == 9 and done["bytes"] == (tmp_path / "out" / "clip0.mp4").stat().st_size
    assert set(done["timings"]["busy_s"]) == {"decode", "copy", "encode"} and len(done["sha256"]) == 64
    assert summary["decode_busy_s"] > 0 and 0 < summary["decode_busy_ratio"] <= 1
    assert summary["wall_after_load_s"] == pytest.approx(summary["wall_s"] - summary["load_s"], abs=1e-3)


def test_start_up_is_accounted_to_the_first_job_and_an_all_skipped_rerun_says_nothing_to_do(tmp_path):
    path = make_batch(tmp_path, 3)
    code, summary, output = batch(str(path))
    assert code == 0, output
    assert set(summary) == {"config", "manifest", "manifest_part", "rank", "world_size", "mode", "jobs", "frames",
                            "load_s", "wall_s", "wall_after_load_s", "decode_busy_s", "decode_busy_ratio",
                            "nothing_to_do", "first_job", "after_first_job", "results", "vaepipe"}
    first, *rest = summary["results"]
    assert summary["first_job"] == {"job": first["job"], "status": "done", "wall_s": first["timings"]["wall_s"],
                                    "decode_busy_s": first["timings"]["busy_s"]["decode"]}
    steady = summary["after_first_job"]
    assert steady["decode_busy_s"] == pytest.approx(sum(r["timings"]["busy_s"]["decode"] for r in rest), abs=1e-3)
    assert 0 < steady["wall_s"] < summary["wall_after_load_s"]
    assert steady["decode_busy_ratio"] == pytest.approx(steady["decode_busy_s"] / steady["wall_s"], abs=1e-3)
    assert "after the first job" in " ".join(output.split())

    code, summary, output = batch(str(path))
    assert code == 0 and summary["nothing_to_do"] and summary["jobs"]["skipped"] == 3
    assert summary["decode_busy_ratio"] is None and summary["after_first_job"] is None
    text = " ".join(output.split())
    assert "nothing to do: all 3 jobs are done" in text
    assert "jobs/s" not in text and "busy 0.0" not in text  # no rate or utilisation of work never done


@pytest.mark.slow
def test_rerun_skips_done_jobs_and_redoes_tampered_changed_or_overwritten_ones(tmp_path):
    path = make_batch(tmp_path, 3)
    assert batch(str(path))[0] == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    code, summary, _ = batch(str(path))
    assert code == 0 and set(statuses(summary).values()) == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    with open(tmp_path / "out" / "clip1.mp4", "ab") as f:
        f.write(b"\0")  # the hash no longer matches the manifest
    (tmp_path / "out" / "clip2.mp4").unlink()
    result = CliRunner().invoke(app, ["batch", str(path), "--json"], env={"COLUMNS": "400"})  # a line per job
    summary = json.loads(result.stdout)
    assert statuses(summary) == {"clip0.mp4": "skipped", "clip1.mp4": "done", "clip2.mp4": "done"}
    replaced = [line for line in result.stderr.splitlines() if "replaced the file that was there" in line]
    assert len(replaced) == 1 and "clip1.mp4" in replaced[0]  # clip2's place was empty
    _, summary, _ = batch(str(path), "--crf", "30")  # other settings: not the same output
    assert set(statuses(summary).values()) == {"done"}
    _, summary, _ = batch(str(path), "--crf", "30", "--overwrite")
    assert set(statuses(summary).values()) == {"done"}


def test_dry_run_lists_resolved_jobs_and_what_would_be_skipped_and_writes_nothing(tmp_path):
    path = make_batch(tmp_path, 3)
    result = CliRunner().invoke(app, ["batch", str(path), "--dry-run", "--crf", "23"])
    assert result.exit_code == 0 and "3 to run, 0 to skip" in result.stdout and "crf=23" in result.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "batch.manifest.jsonl").exists()
    assert " fast=" not in result.stdout  # a retired alias that changes nothing is no setting to show
    assert batch(str(path), "--shard", "0/2")[0] == 0  # jobs 0 and 2
    _, plan, _ = batch(str(path), "--dry-run")
    assert [j["action"] for j in plan["jobs"]] == ["skip (done)", "run", "skip (done)"]


def test_out_of_memory_fails_that_job_and_the_next_one_starts_clean(tmp_path, monkeypatch):
    path = make_batch(tmp_path, 3)
    real = runner_module.decode_stream
    seen = []

    def oom_on_second(vae, z):
        seen.append(z)
        if len(seen) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield from real(vae, z)

    monkeypatch.setattr(runner_module, "decode_stream", oom_on_second)
    code, summary, output = batch(str(path))
    assert code == 1 and statuses(summary) == {"clip0.mp4": "done", "clip1.mp4": "failed", "clip2.mp4": "done"}
    assert "out of GPU memory" in latest(path)["clip1.mp4"]["error"] and leftovers(tmp_path) == []


def test_multi_sample_latents_record_every_output_and_resume(tmp_path):
    path = make_batch(tmp_path, 1)
    write_latents(tmp_path / "lat" / "clip0.pt", (2, *SHAPE))
    assert batch(str(path))[0] == 0
    record = latest(path)["clip0.mp4"]
    assert [Path(f["path"]).name for f in record["files"]] == ["clip0_0.mp4", "clip0_1.mp4"]
    assert record["frames"] == 18 and record["sha256"] is None
    assert set(statuses(batch(str(path))[1]).values()) == {"skipped"}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_job_then_rerun_finishes_the_rest_and_redoes_nothing_done(tmp_path, signum):
    # Jobs of about a second each, so that the signal lands mid-batch and not as the process exits.
    path = make_batch(tmp_path, 6, shape=(16, 5, 6, 10))
    proc = start_vaepipe("batch", str(path), "-q", stderr=subprocess.PIPE)
    manifest = tmp_path / "batch.manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for one job done and the next one's ffmpeg writing its temp file
        done = {n for n, r in latest(path).items() if r["status"] == "done"} if manifest.exists() else set()
        writing = {p.name.split(".")[1] for p in (tmp_path / "out").glob(".*.part")} if done else set()
        if done and writing - {n.removesuffix(".mp4") for n in done}:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    ffmpegs = ffmpeg_processes_under(tmp_path)
    assert ffmpegs, "an ffmpeg should be encoding mid-job"
    proc.send_signal(signum)
    code = proc.wait(timeout=60)
    done_before = {n: r for n, r in latest(path).items() if r["status"] == "done"}
    assert 1 <= len(done_before) < 6
    if signum == signal.SIGTERM:  # the clean-up path: no temp file, no ffmpeg, the job marked interrupted
        assert code == 130 and "interrupted" in proc.stderr.read()
        assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []
        assert "interrupted" in {r["status"] for r in latest(path).values()}
    else:  # ffmpeg sees its input close and exits by itself; its temp file stays until that job runs again
        assert code == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while ffmpeg_processes_under(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ffmpeg_processes_under(tmp_path) == []
    finished = {p.name for p in (tmp_path / "out").glob("*.mp4")}
    assert finished == set(done_before), "only finished jobs have an output, never a partial file"
    mtimes = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in finished}

    code, summary, output = batch(str(path))
    assert code == 0, output
    assert {n for n, s in statuses(summary).items() if s == "skipped"} == set(done_before)
    assert {n for n, s in statuses(summary).items() if s == "done"} == {f"clip{i}.mp4" for i in range(6)} - set(
        done_before)
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in finished} == mtimes
    assert leftovers(tmp_path) == []
    for i in range(6):
        assert read_video(tmp_path / "out" / f"clip{i}.mp4").shape == (17, 48, 80, 3)
    assert {r["status"] for r in latest(path).values()} == {"done"}


def spec(i: int) -> JobSpec:
    return JobSpec(index=i, name=f"jobs[{i}]", latents=Path(f"{i}.pt"), output=Path(f"{i}.mp4"),
                   decode=DecodeOptions(), encode=EncodeOptions())


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shares_are_disjoint_complete_and_stable_for_any_world_size(size):
    jobs = [spec(i) for i in range(23)]
    shares = [[j.index for j in World(rank=r, size=size).take(jobs)] for r in range(size)]
    assert sorted(i for share in shares for i in share) == list(range(23))
    assert all(share == sorted(share) for share in shares)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_world_comes_from_torchrun_variables_or_shard(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert World.detect() == World() and World.detect((1, 3)) == World(rank=1, size=3, how="shard")
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert World.detect() == World(rank=4, size=6, local_rank=0, how="torchrun")
    with pytest.raises(Exception, match="drop --shard"):
        World.detect((0, 2))


def test_shards_0_of_2_and_1_of_2_are_disjoint_and_complete(tmp_path):
    path = make_batch(tmp_path, 5)
    plans = [batch(str(path), "--dry-run", "--shard", s)[1] for s in ("0/2", "1/2")]
    shares = [{j["output"] for j in plan["jobs"]} for plan in plans]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == {str(j.output) for j in load_config(path).jobs}
    assert batch(str(path), "--shard", "1/3")[0] == 0 and batch(str(path), "--shard", "3/3")[0] == 2


@pytest.mark.parametrize("world_size", [2, 3])
def test_torchrun_ranks_run_every_job_exactly_once_and_the_merged_manifest_resumes(tmp_path, monkeypatch,
                                                                                 world_size):
    path = make_batch(tmp_path, 4)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # the variables alone: no process group, no merge
    summaries = []
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        code, summary, output = batch(str(path))
        assert code == 0, output
        summaries.append(summary)
    parts = sorted(p.name for p in tmp_path.glob("batch.manifest.*.jsonl"))
    assert parts == [f"batch.manifest.rank{r}-of-{world_size}.jsonl" for r in range(world_size)]
    runs = [json.loads(line)["output"] for part in parts for line in (tmp_path / part).read_text().splitlines()
            if json.loads(line)["status"] == "done"]
    assert sorted(runs) == sorted(str(j.output) for j in load_config(path).jobs)  # each exactly once
    assert combine(summaries)["jobs"]["done"] == 4
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    code, summary, _ = batch(str(path))  # a plain run: skips everything and merges the parts
    assert code == 0 and set(statuses(summary).values()) == {"skipped"}
    assert list(tmp_path.glob("batch.manifest.*.jsonl")) == []
    lines = (tmp_path / "batch.manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {json.loads(line)["status"] for line in lines} == {"done"}


@pytest.mark.slow
def test_gpus_2_on_cpu_starts_workers_through_torchrun_and_rank_0_merges(tmp_path):
    path = make_batch(tmp_path, 3, bad={2})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "vaepipe", "batch", str(path), "--gpus", "2", "--device", "cpu",
                          "--json", "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # job 2 failed; the workers agree on the exit code
    summary = json.loads(run.stdout)
    assert summary["world_size"] == 2 and summary["mode"] == "torchrun" and len(summary["ranks"]) == 2
    assert summary["jobs"] == {"total": 3, "done": 2, "failed": 1, "skipped": 0, "interrupted": 0}
    assert list(tmp_path.glob("batch.manifest.*.jsonl")) == []  # merged by rank 0
    assert {n: r["status"] for n, r in latest(path).items()} == {"clip0.mp4": "done", "clip1.mp4": "done",
                                                                 "clip2.mp4": "failed"}
    assert {r["rank"] for r in latest(path).values()} == {0, 1}


def test_manifest_ignores_a_torn_last_line_and_keeps_the_newest_record(tmp_path):
    manifest = Manifest(tmp_path / "m.jsonl")
    manifest.write({"output": "a", "status": "running", "time": 1})
    manifest.write({"output": "a", "status": "done", "time": 2})
    manifest.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"output": "a", "status": "fai')
    assert manifest.latest()["a"]["status"] == "done"


def test_bad_shard_and_gpus_without_gpus_are_bad_input(tmp_path):
    path = make_batch(tmp_path, 1)
    code, _, output = batch(str(path), "--shard", "two")
    assert code == 2 and "I/N" in output
    if not torch.cuda.is_available():
        code, _, output = batch(str(path), "--gpus", "2")
        assert code == 2 and "--device cpu" in output


@pytest.mark.slow
def test_the_shipped_demo_config_runs_as_its_header_says(tmp_path):
    from vaepipe.latents import write_synthetic

    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "demo-cpu.toml"
    path.write_text((ROOT / "configs" / "demo-cpu.toml").read_text())
    for i in range(4):
        write_synthetic(tmp_path / "demo" / "batch" / "latents" / f"clip{i}.pt", size="48x80x17", channels=16,
                        seed=i)
    write_synthetic(tmp_path / "demo" / "batch" / "hero.pt", size="64x96x17", channels=16, seed=9)
    code, summary, output = batch(str(path), "-q", "--allow-outside")  # it writes to ../demo, as make batch does
    assert code == 0 and summary["jobs"]["done"] == 5, output
    assert sorted(p.name for p in (tmp_path / "demo" / "batch" / "videos").iterdir()) == [
        "clip0.mp4", "clip1.mp4", "clip2.mp4", "clip3.mp4", "hero.mkv"]
    for name in ("wan2.1-480p", "wan2.2-720p", "glob"):  # these need their (large) inputs made first
        data = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text())
        assert set(data) == {"defaults", "jobs"} and set(data["defaults"]) <= OPTION_KEYS.keys()


@pytest.mark.slow
def test_ctrl_c_twice_mid_batch_leaves_only_whole_videos_and_no_ffmpeg(tmp_path):
    path = make_batch(tmp_path, 6, shape=(16, 5, 6, 10))
    proc = start_vaepipe("batch", str(path), "-q", stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob(".*.part")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read()
    assert leftovers(tmp_path) == [] and ffmpeg_processes_under(tmp_path) == []
    finished = {p.name for p in (tmp_path / "out").glob("*.mp4")}
    assert finished == {n for n, r in latest(path).items() if r["status"] == "done"}
    assert len(finished) < 6
    for name in finished:  # whatever finished is whole
        assert read_video(tmp_path / "out" / name).shape == (17, 48, 80, 3)
