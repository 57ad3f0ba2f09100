"""The refinement worker: turns a recorded session's Stage-1 latents into ``refined.mp4``.

For each job it claims (:mod:`stream_server.jobs`) it

1. loads the session's latents (a memory map of ``latents.f16``), its seed and its prompt schedule:
   ``[(first latent frame, prompt)]``, each prompt from the chunk it took effect at
   (:func:`stream_server.recording.prompt_schedule`);
2. runs the refiner block by block (``refine(latents, schedule, seed=, start_frame=, refined_prefix=)``,
   the signature of ``world_model.refiner.Refiner.refine_blocks``), saving each refined block
   (float16) under ``refine/`` before using it, and recording the progress;
3. decodes each block with the streaming causal VAE decoder (dropping the start frame, as the live
   path does, so the refined video has the preview's frame count) and encodes it into a temporary MP4;
4. closes and fsyncs the MP4, reads it back (its frame count must be what was written) and, in one
   transaction with marking the job done, renames it to ``refined.mp4``.

A write failure (a full disk: ``ENOSPC``, failing the job without retry) deletes the temporary MP4 and
leaves ``preview.mp4`` alone; ``refined.mp4`` only ever appears complete.

After a crash a new attempt resumes from the saved blocks: they are decoded again (cheap next to
refining) to rebuild the decoder cache and the video, and the refiner continues from the next block.

Priority policy: inside ``serve`` the worker runs as a separate process started with ``--low-priority``
and ``--yield-to-live``. The first puts it in the idle scheduling class (``SCHED_IDLE``, else nice 19)
with one CPU thread. The second makes it wait, before each refiner forward and each block's decode, for a
gap in the live sessions' steps long enough for it (:mod:`stream_server.gate`: the engine loop publishes
when its next live step starts), so on a shared device (CPU or GPU) the refiner only uses time the live
sessions leave free, at the granularity of one DiT forward. ``--refiner-device`` (``serve``) or a ``refine``
process on another machine sharing the data dir keeps it off the live device altogether.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from world_model.vae import DecoderCache

from .gate import DeviceGate, Pacer
from .jobs import Job, JobQueue, LeaseLost
from .recording import PREVIEW_OPTIONS, RecordingStore, prompt_schedule

log = logging.getLogger(__name__)

RefineFn = Callable[..., Iterator[torch.Tensor]]  # Refiner.refine_blocks(latents, schedule, *, seed, start_frame, refined_prefix, pace)
REFINED = "refined.mp4"
BLOCKS_DIR = "refine"  # refined latent blocks of an unfinished job, one .npy per block


class BlockDecoder(Protocol):
    """The parts of :class:`world_model.vae.VideoVAE` the worker uses."""

    def new_decoder_cache(self) -> DecoderCache: ...

    def decode_chunk(self, latents_chunk: torch.Tensor, cache: DecoderCache) -> torch.Tensor: ...

    @staticmethod
    def to_uint8(video: torch.Tensor) -> np.ndarray: ...


class RecordingError(Exception):
    """The recording cannot be refined (missing, incomplete, another model); retrying will not help."""


class RefinerUnavailable(Exception):
    """No refiner can be built for the requested model (a one-line reason for the CLI)."""


# The refiner preset (world_model.refiner.REFINER_PRESETS, random weights) for the sessions of each built-in model.
REFINER_FOR = {"tiny": "tiny", "sana-wm-streaming": "ltx2", "sana-wm-bidirectional": "ltx2"}


def refiner_unavailable(model: str, checkpoint: str | None = None, *, trained: bool = False) -> str | None:
    """Why no refiner can be built for the sessions of ``model`` (a one-line reason), or None when one can;
    ``trained``: the sessions ran on trained weights. Builds nothing. ``serve`` queues no refinement for a
    model with a reason (its replays are preview-only) and :func:`load_refiner` refuses it."""
    from world_model.engine import VAE_FOR

    try:
        from world_model.refiner import REFINER_PRESETS
    except ModuleNotFoundError as exc:
        return f"the refiner is not available ({exc})"
    if checkpoint is not None:
        return "refining sessions of a --checkpoint model is not supported yet (only built-in presets)"
    if model not in VAE_FOR:
        return f"unknown model {model!r}; built in: {', '.join(sorted(VAE_FOR))}"
    if REFINER_FOR.get(model) not in REFINER_PRESETS:
        return f"no refiner for model {model}"
    if trained:  # the refiner presets have random weights: they would turn a trained model's latents into noise
        return f"no refiner for the trained weights of model {model}"
    return None


def load_refiner(model: str, checkpoint: str | None, *, device: str, dtype: str) -> tuple[RefineFn, BlockDecoder]:
    """The refiner's ``refine_blocks`` and the VAE of ``model`` (the engine's: same preset and seed)."""
    from world_model.engine import DTYPES, VAE_FOR, EngineConfig
    from world_model.vae import VideoVAE

    if (reason := refiner_unavailable(model, checkpoint)) is not None:
        raise RefinerUnavailable(reason)
    from world_model.refiner import Refiner

    seed, torch_dtype = EngineConfig().seed, DTYPES[dtype]
    refiner = Refiner.from_preset(REFINER_FOR[model], seed, torch_dtype, device)
    vae = VideoVAE.from_preset(VAE_FOR[model], seed=seed, dtype=torch_dtype, device=device)
    return refiner.refine_blocks, vae


def lower_priority() -> None:
    """Make this process use only CPU time that others leave free (see the module docstring)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    torch.set_num_threads(1)


class RefineWorker:
    """Claims and runs refinement jobs of one data dir for one model."""

    def __init__(self, store: RecordingStore, queue: JobQueue, refine: RefineFn, vae: BlockDecoder, *, model: str,
                 lease_seconds: float = 30.0, worker_id: str | None = None, gate: DeviceGate | None = None) -> None:
        self.store = store
        self.queue = queue
        self.refine = refine
        self.vae = vae
        self.model = model
        self.lease_seconds = lease_seconds
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        # live sessions first: wait for a gap before each forward and decode (stream_server.gate)
        self.pacer = Pacer(gate, sync=_sync_device)

    def run(self, session_id: str | None = None, *, follow: bool = False, poll_seconds: float = 2.0,
            stop: threading.Event | None = None) -> int:
        """Run jobs (all, or the one of ``session_id``) until none is left unfinished (``follow``: until
        ``stop`` is set); returns the number of jobs this worker finished."""
        stop = stop or threading.Event()
        finished = 0
        while not stop.is_set():
            job = self.queue.claim(self.worker_id, self.lease_seconds, session_id)
            if job is not None:
                finished += self.process(job) == "done"
                continue
            next_at = self.queue.pending(session_id)  # a backoff or another worker's lease
            if next_at is None and not follow:
                break
            wait = poll_seconds if next_at is None else min(poll_seconds, max(0.05, next_at - time.time() + 0.05))
            stop.wait(wait)
        return finished

    def process(self, job: Job) -> str:
        """One attempt at ``job``; returns the state it leaves the job in."""
        log.info("refining session %s (attempt %d)", job.session_id[:8], job.attempts)
        lost = threading.Event()
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, lost, done), daemon=True)
        beat.start()
        try:
            self._refine(job, lost)
            state = "done"
        except LeaseLost:
            log.warning("session %s: lease lost; another worker has the job", job.session_id[:8])
            state = "lost"
        except RecordingError as exc:
            state = self.queue.fail(job, str(exc), retry=False)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                state = self.queue.fail(job, f"disk full while refining: {exc}", retry=False)
            else:
                state = self.queue.fail(job, f"{type(exc).__name__}: {exc}", retry=True)
        except Exception as exc:
            log.exception("refining session %s failed", job.session_id[:8])
            state = self.queue.fail(job, f"{type(exc).__name__}: {exc}", retry=True)
        finally:
            done.set()
            beat.join()
        log.info("session %s: %s", job.session_id[:8], state)
        return state

    def _heartbeat(self, job: Job, lost: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            try:
                self.queue.heartbeat(job, self.lease_seconds)
            except LeaseLost:
                lost.set()
                return
            except Exception:  # a locked or busy database: try again at the next beat
                log.warning("heartbeat for session %s failed", job.session_id[:8], exc_info=True)

    def _refine(self, job: Job, lost: threading.Event) -> None:
        meta = self.store.read_meta(job.session_id)
        if meta is None:
            raise RecordingError("the recording is gone")
        if meta.get("recording_error"):
            raise RecordingError(f"the recording is incomplete: {meta['recording_error']}")
        if meta.get("ended_at") is None or meta.get("frames") is None:
            raise RecordingError("the recording was not closed (the server stopped during the session; its next start recovers it)")
        if meta["model"] != self.model:
            raise RecordingError(f"recorded with model {meta['model']}; this worker refines {self.model}")
        try:
            latents = torch.from_numpy(np.ascontiguousarray(self.store.load_latents(job.session_id)))[None]  # (1, C, T, h, w)
            prompts = prompt_schedule(meta)
        except (ValueError, KeyError) as exc:
            raise RecordingError(f"the recording is malformed: {exc}") from None
        total = latents.shape[2]
        folder = self.store.folder(job.session_id)
        blocks_dir = folder / BLOCKS_DIR
        blocks_dir.mkdir(exist_ok=True)
        prefix = _saved_blocks(blocks_dir)
        tmp = folder / f"{REFINED}.{self.worker_id.replace(':', '-')}.tmp"
        video: _VideoWriter | None = None
        try:
            video = _VideoWriter(tmp, meta["width"], meta["height"], meta["fps"])
            cache = self.vae.new_decoder_cache()
            for block in prefix:  # resume: rebuild the decoder cache and the video so far
                video.write(self._decode(block, cache))
            done_frames = sum(b.shape[2] for b in prefix)
            refined_prefix = torch.cat(prefix, dim=2).float() if prefix else None
            blocks = self.refine(latents.float(), prompts, seed=meta["seed"], start_frame=done_frames,
                                 refined_prefix=refined_prefix, pace=self.pacer)
            for block in blocks:
                if lost.is_set():
                    raise LeaseLost(job.session_id)
                block = block.detach().to("cpu", torch.float16)  # what is saved is what is decoded
                if block.dim() != 5 or block.shape[:2] != latents.shape[:2] or block.shape[3:] != latents.shape[3:]:
                    raise RuntimeError(f"the refiner yielded a block of shape {tuple(block.shape)} for latents {tuple(latents.shape)}")
                _save_block(blocks_dir, done_frames, block)
                video.write(self._decode(block, cache))
                done_frames += block.shape[2]
                self.queue.heartbeat(job, self.lease_seconds, progress=done_frames / total)
            if done_frames != total:
                raise RuntimeError(f"the refiner yielded {done_frames} latent frames of {total}")
            if video.frames != meta["frames"]:
                raise RuntimeError(f"refined video has {video.frames} frames; the preview has {meta['frames']}")
            video.close()
            if (on_disk := _video_frames(tmp)) != video.frames:  # what a reader will get, not what was sent
                raise RuntimeError(f"the refined video reads back with {on_disk} of its {video.frames} frames")
        except BaseException:
            if video is not None:
                video.abort()
            tmp.unlink(missing_ok=True)  # a partial file, never renamed; on a full disk its space is needed
            raise
        finally:
            self.pacer.finish()  # the last unit's time ends here, not at the next job's first turn

        def commit() -> None:
            os.replace(tmp, folder / REFINED)
            _fsync_dir(folder)

        try:
            self.queue.finish(job, commit)
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(blocks_dir, ignore_errors=True)
        for stale in folder.glob(f"{REFINED}.*.tmp"):  # left by workers that died
            stale.unlink(missing_ok=True)

    def _decode(self, block: torch.Tensor, cache: DecoderCache) -> np.ndarray:
        """Frames ``(n, H, W, 3)`` uint8 of the next latent block; the start frame is dropped as live."""
        first = not cache.started
        self.pacer("decode")
        with torch.inference_mode():
            video = self.vae.decode_chunk(block, cache)
        if first:
            video = video[:, :, 1:]
        return self.vae.to_uint8(video)[0]


def _sync_device() -> None:
    """Wait for this process's queued GPU work, so that a unit's time is the device's, not its launch's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _video_frames(path: Path) -> int:
    """Video frames (packets) of an MP4, read back from the file."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _saved_blocks(blocks_dir: Path) -> list[torch.Tensor]:
    """The refined blocks saved by earlier attempts, in order, as long as they are contiguous from 0."""
    blocks, start = [], 0
    for path in sorted(blocks_dir.glob("block-*.npy")):
        if int(path.stem.split("-")[1]) != start:
            break
        block = torch.from_numpy(np.load(path))
        blocks.append(block)
        start += block.shape[2]
    return blocks


def _save_block(blocks_dir: Path, start: int, block: torch.Tensor) -> None:
    path = blocks_dir / f"block-{start:06d}.npy"
    tmp = blocks_dir / f"block-{start:06d}.tmp.npy"
    with open(tmp, "wb") as f:
        np.save(f, block.numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _VideoWriter:
    """An H.264 MP4 written frame by frame; :meth:`close` flushes and fsyncs it."""

    def __init__(self, path: Path, width: int, height: int, fps: int) -> None:
        import av

        self.path = path
        self.frames = 0
        self._av = av
        self._container = av.open(str(path), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = dict(PREVIEW_OPTIONS, crf="18")

    def write(self, frames: np.ndarray) -> None:
        for rgb in frames:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> None:
        self._container.mux(self._stream.encode())
        self._container.close()
        self._container = None
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())

    def abort(self) -> None:
        """Close without finishing (after an error); a no-op after :meth:`close`."""
        if self._container is not None:
            self._container.close()
            self._container = None
