"""The Python API: a diffusers script's latents into video files, on the pipeline's own VAE, through the same three
lanes as the command line (and the same bytes, for the same latents and options).

    latents = pipe(prompt=prompt, num_frames=81, output_type="latent").frames
    vaepipe.export_video(latents, "out.mp4", pipe=pipe, fps=16, metadata={"prompt": prompt, "seed": 42})

    with vaepipe.Exporter(pipe=pipe) as exporter:         # buffers kept from clip to clip
        for i, prompt in enumerate(prompts):
            latents = pipe(prompt=prompt, output_type="latent").frames
            exporter.export(latents, f"clip{i}.mp4", wait=False)   # ffmpeg finishes while the next clip generates
"""

from __future__ import annotations

import functools
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from .encode import EncodeOptions
from .errors import BadInput, VaepipeError
from .latents import from_tensor
from .progress import Reporter
from .runner import DecodeOptions, Session, Streamed, summarize
from .vae import LoadedVae


def _in_python_words(method):
    """The library's messages name the command line's options (`--vae`, `--no-pad`); from the API they name its
    arguments (`vae=`, `pad=False`), so that a script's author reads what to change in the script."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BadInput as e:
            raise BadInput(python_words(str(e))) from None
    return wrapper


def python_words(message: str) -> str:
    message = re.sub(r"(?<![\w/.-])--vae\b", "vae= (or pipe=)", message)
    message = re.sub(r"(?<![\w/.-])--no-([a-z][a-z0-9-]*)", lambda m: f"{m.group(1).replace('-', '_')}=False", message)
    return re.sub(r"(?<![\w/.-])--([a-z][a-z0-9-]*)", lambda m: f"{m.group(1).replace('-', '_')}=", message)


class Pending:
    """An export whose frames are all decoded and in ffmpeg, which is still finishing the file(s). `result()` waits
    and returns the summary (or raises what went wrong: the file is then not written)."""

    def __init__(self, outputs: list[Path], futures: list[Future]):
        self.outputs = outputs
        """The files this export writes (one per sample of the batch)."""
        self._futures = futures
        self.taken = False
        """result() was called: Exporter.wait() leaves this one to its caller."""

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def result(self, timeout: float | None = None) -> dict:
        """Wait for every file of this export to be in place; return {"outputs": [one summary per file]}."""
        self.taken = True
        return {"outputs": [f.result(timeout) for f in self._futures]}


class Exporter:
    """Writes latents from a diffusers video pipeline to video files with its already-loaded VAE: no second copy of
    the model, no file round trip. Keeps the lane buffers from one export to the next; `export(..., wait=False)`
    returns as soon as the frames are in ffmpeg, so the caller generates the next clip while the encoder finishes.

    Give the VAE (`vae=pipe.vae`) or the pipeline (`pipe=pipe`). It decodes on the VAE's device, in its dtype, as
    the command line does: on a GPU with vaepipe's engine (kept from clip to clip, with what it tuned), fast by
    default, `exact=True` for the bits of the pipeline's own `vae.decode`; on the CPU with diffusers' decoder.
    `max_vram="6GiB"` (or `bands=N`) decodes frames too large for the GPU in horizontal bands (Wan). As a
    context manager, leaving the block waits for every file; without one, call `wait()` (or each
    `Pending.result()`) before relying on the files. Use one Exporter from one thread.
    """

    @_in_python_words
    def __init__(self, vae: torch.nn.Module | None = None, *, pipe=None, exact: bool = False, chunk: int | None = None,
                 buffers: int = 2, sync: bool = False, bands: int | None = None, max_vram: str | int | None = None,
                 progress: bool = False):
        model = _vae_of(vae, pipe)
        self._vae = LoadedVae(model=model, source=f"{type(model).__name__} (passed in)")
        self._options = DecodeOptions(exact=exact, chunk=chunk, buffers=buffers, sync=sync, bands=bands,
                                      max_vram=max_vram)
        self._reporter = Reporter(quiet=not progress)
        self._session = Session(self._reporter)
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="vaepipe-finish")
        self._pending: list[Pending] = []
        self._lock = threading.Lock()
        self._closed = False

    @_in_python_words
    def export(self, latents: torch.Tensor, output: str | os.PathLike, *, fps: float | None = None,
               codec: str | None = None, crf: int = 18, preset: str = "medium", pix_fmt: str | None = None,
               pad: bool = True, audio: str | os.PathLike | None = None, cut_audio: bool = True,
               metadata: dict | None = None, no_metadata: bool = False, denormalize: bool = True,
               wait: bool = True) -> dict | Pending:
        """Decode `latents` ([B, C, T, H, W] as `pipe(..., output_type="latent").frames` returns them: normalised,
        on any device) into `output`; a batch of B writes out_0.mp4 … out_{B-1}.mp4. The options are the CLI's
        (`fps` defaults to 16). `metadata`: tags, {"prompt": …, "seed": …}: the prompt becomes the title, the rest
        a JSON comment. `denormalize=False` for latents already in the VAE's space.

        Returns the summary, {"outputs": [...]}, once the files are in place; with `wait=False` a `Pending` as soon
        as the frames are in ffmpeg. Raises BadInput (nothing written) for bad latents or options."""
        if self._closed:
            raise VaepipeError("this Exporter is closed: make a new one (or export inside its with-block)")
        latents = getattr(latents, "frames", latents)  # the pipeline's output object itself
        if not isinstance(output, str | os.PathLike) or not isinstance(os.fspath(output), str):
            raise BadInput(f"output must be a path as str or pathlib.Path, got {type(output).__name__}"
                           f" {output!r:.60}: pass it as text (output.decode() for bytes)")
        encode = EncodeOptions(codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, fps=fps, pad=pad, audio=audio,
                               cut_audio=cut_audio, metadata=metadata, no_metadata=no_metadata)
        options = replace(self._options, denormalize=denormalize)
        _run_offload_hook(self._vae.model)
        with self._reporter:
            job = self._session.prepare(from_tensor(latents), output, options, encode, vae=self._vae)
            futures = []
            try:
                for streamed in self._session.stream(job):
                    try:
                        futures.append(self._finisher.submit(_finish, job, streamed))
                    except BaseException:
                        streamed.abort()
                        raise
            except BaseException:
                for f in futures:  # the samples already in ffmpeg still finish; this one's error is raised
                    f.exception()
                raise
        pending = Pending([p.dest for p in job.plans], futures)
        if wait:
            return pending.result()
        with self._lock:
            self._pending = [p for p in self._pending if not (p.taken and p.done())] + [pending]
        return pending

    def wait(self) -> list[dict]:
        """Wait for every export still finishing; return the summaries not yet taken through `Pending.result()`
        (raise the first failure among them)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for p in pending:
            for f in p._futures:
                f.exception()  # every file finished or failed before anything is raised
        return [p.result() for p in pending if not p.taken]

    def close(self) -> None:
        """Wait for the files still finishing, then let the finishing thread go."""
        self._closed = True
        try:
            self.wait()
        finally:
            self._finisher.shutdown(wait=True)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an error: the clips already decoded are still finished, without masking that error.
        self._closed = True
        with self._lock:
            pending, self._pending = self._pending, []
        for p in pending:
            for f in p._futures:
                f.exception()
        self._finisher.shutdown(wait=True)


def export_video(latents: torch.Tensor, output: str | os.PathLike, *, vae: torch.nn.Module | None = None, pipe=None,
                 exact: bool = False, chunk: int | None = None, buffers: int = 2, sync: bool = False,
                 progress: bool = False, **options) -> dict:
    """Write `latents` from a diffusers video pipeline (`output_type="latent"`) to `output` with the pipeline's own
    VAE (`vae=pipe.vae` or `pipe=pipe`); return the summary. The drop-in for diffusers' `export_to_video` (with
    `exact=True`, or on the CPU: the very frames of the pipeline's own decode). Options as in `Exporter.export` (fps,
    codec, crf, preset, pix_fmt, pad, audio, cut_audio, metadata, no_metadata, denormalize). For many clips, keep
    one `Exporter`."""
    with Exporter(vae, pipe=pipe, exact=exact, chunk=chunk, buffers=buffers, sync=sync,
                  progress=progress) as exporter:
        return exporter.export(latents, output, **options)


def _finish(job, streamed: Streamed) -> dict:
    stats, size = streamed.finish()
    return summarize(job, streamed.plan, stats, size)


def _vae_of(vae, pipe) -> torch.nn.Module:
    if (vae is None) == (pipe is None):
        raise BadInput("give the VAE (vae=pipe.vae) or the pipeline (pipe=pipe), one of the two")
    if pipe is not None:
        vae = getattr(pipe, "vae", None)
        if vae is None:
            raise BadInput(f"the pipeline ({type(pipe).__name__}) has no .vae: pass vae= instead")
    if not (isinstance(vae, torch.nn.Module) and hasattr(vae, "config") and callable(getattr(vae, "decode", None))):
        raise BadInput(f"vae must be a diffusers video VAE (such as AutoencoderKLWan), got a {type(vae).__name__}")
    if any(p.device.type == "meta" for p in vae.parameters()):
        raise BadInput("the VAE's weights are not loaded (sequential CPU offload keeps them on the meta device):"
                       " use pipe.enable_model_cpu_offload() or keep the VAE on the GPU")
    return vae


def _run_offload_hook(model: torch.nn.Module) -> None:
    """A pipeline with `enable_model_cpu_offload()` keeps the VAE on the CPU until it is used; its hook moves it to
    the GPU (and the other models off it), as diffusers does before `vae.decode`."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(model)
