"""Recording of live sessions into ``<data-dir>/sessions/<session_id>/``, written as the session runs.

One folder per session that produced at least one chunk::

    meta.json         what the session was: model, size, fps, seed, times, prompt changes (with the chunk
                      index they took effect at), the token's SHA-256 (never the token), file layout
    start.png         the start image as uploaded (absent when none was given)
    chunks.jsonl      one line per chunk, appended: frames, timing, the input that drove it, a new prompt
    poses.f64         per-frame camera-to-world poses, appended: raw float64 (frames, 4, 4)
    latents.f16       the clean Stage-1 latents, appended: raw float16 (T, C, h, w), one latent frame after
                      another, so that a memory map reads the whole session without holding it
    preview.mp4.part  the live-quality H.264 video of the delivered frames while the session runs;
                      renamed to preview.mp4 once the encoder is flushed and closed at the end

All file writing and H.264 encoding happen on one writer thread per session, fed through a short queue,
so the event loop never waits on the disk or the encoder and nothing of a long session stays in memory.
Every chunk is written whole (video, latents, poses, line) by that one thread, so the files always agree
on how many chunks were recorded.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

from world_model.engine_api import ChunkResult, EngineInfo

from .sessions import ChunkInput, Session, SessionRecord

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")  # what a session id may look like (token_urlsafe)
MAX_QUEUED_CHUNKS = 8  # chunks waiting for a writer thread before the engine loop waits for it
PREVIEW_OPTIONS = {"crf": "23", "preset": "veryfast"}  # live quality, cheap to encode


def token_hash(token: str) -> str:
    """The stored form of a session token (tokens are 256-bit random, so a plain SHA-256 suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def valid_session_id(session_id: str) -> bool:
    """Whether ``session_id`` may name a folder (checked before any path is built from it)."""
    return SESSION_ID.fullmatch(session_id) is not None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RecordingStore:
    """The ``sessions/`` folder of a data dir: where each session's files live and how to read them."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "sessions"

    def folder(self, session_id: str) -> Path:
        if not valid_session_id(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.root / session_id

    def read_meta(self, session_id: str) -> dict[str, Any] | None:
        """The session's ``meta.json``, or None for an unknown (or malformed) id."""
        if not valid_session_id(session_id):
            return None
        try:
            return json.loads((self.root / session_id / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def session_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and valid_session_id(p.name)]

    def load_latents(self, session_id: str) -> np.ndarray:
        """The recorded Stage-1 latents ``(C, T, h, w)`` float16, as a read-only memory map."""
        meta = self.read_meta(session_id)
        if meta is None:
            raise FileNotFoundError(f"no recording for session {session_id}")
        latent = meta.get("latents")
        if latent is None:
            raise ValueError("the session recorded no latents (its engine does not return them)")
        shape = (latent["frames"], latent["channels"], latent["height"], latent["width"])
        frames = np.memmap(self.folder(session_id) / latent["file"], dtype=np.float16, mode="r", shape=shape)
        return frames.transpose(1, 0, 2, 3)  # (T, C, h, w) -> (C, T, h, w), still a view of the map


@dataclass(frozen=True)
class _Chunk:
    """One delivered chunk on its way to the writer thread."""

    frames: np.ndarray  # (n, H, W, 3) uint8
    latents: np.ndarray | None  # (C, T, h, w) float16
    poses: np.ndarray  # (n, 4, 4)
    line: dict[str, Any]  # its chunks.jsonl entry


class SessionRecording:
    """The files of one session; :meth:`add` from the event loop, :meth:`close` once at the end."""

    def __init__(self, folder: Path, meta: dict[str, Any], image: np.ndarray | None) -> None:
        self.folder = folder
        self.meta = meta
        self.error: str | None = None  # set by the writer thread when writing failed (e.g. disk full)
        self.chunks = 0  # chunks written
        self.frames = 0  # video frames written
        self.latent_frames = 0
        self._queue: queue.Queue[_Chunk | None] = queue.Queue()
        self._closed = False
        folder.mkdir(parents=True, exist_ok=True)
        if image is not None:
            from PIL import Image

            Image.fromarray(image).save(folder / "start.png")
        meta["start_image"] = None if image is None else "start.png"
        self._write_meta()
        self._thread = threading.Thread(target=self._run, name=f"record-{folder.name[:8]}", daemon=True)
        self._thread.start()

    async def add(self, frames: np.ndarray, latents: np.ndarray | None, poses: np.ndarray, line: dict[str, Any]) -> None:
        """Queue one chunk; waits (without blocking the event loop) while the writer is far behind."""
        while self._queue.qsize() >= MAX_QUEUED_CHUNKS and not self._closed:
            await asyncio.sleep(0.01)
        if not self._closed:
            self._queue.put(_Chunk(frames, latents, poses, line))

    async def close(self, ended: dict[str, Any]) -> None:
        """Write what is queued, close the video and finish ``meta.json`` with ``ended``."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self.meta.update(ended)
        self.meta.update(chunks=self.chunks, frames=self.frames, prompts=self._prompt_changes())
        if self.meta.get("latents") is not None:
            self.meta["latents"]["frames"] = self.latent_frames
        self.meta["recording_error"] = self.error
        if self.error is None:
            self.meta["preview"] = "preview.mp4"
        await asyncio.to_thread(self._write_meta)

    # -- the writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        import av

        container = None
        stream = None
        files: dict[str, Any] = {}
        try:
            while (chunk := self._queue.get()) is not None:
                if self.error is not None:
                    continue  # drain and drop: the recording is already broken
                if container is None:
                    container = av.open(str(self.folder / "preview.mp4.part"), mode="w", format="mp4")
                    stream = container.add_stream("libx264", rate=Fraction(self.meta["fps"]))
                    stream.width, stream.height, stream.pix_fmt = self.meta["width"], self.meta["height"], "yuv420p"
                    stream.options = dict(PREVIEW_OPTIONS)
                    files = {name: open(self.folder / name, "ab") for name in ("chunks.jsonl", "poses.f64", "latents.f16")}
                for rgb in chunk.frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
                if chunk.latents is not None:
                    files["latents.f16"].write(np.ascontiguousarray(chunk.latents.astype(np.float16).transpose(1, 0, 2, 3)).tobytes())
                    self.latent_frames += chunk.latents.shape[1]
                files["poses.f64"].write(np.ascontiguousarray(chunk.poses, dtype=np.float64).tobytes())
                files["chunks.jsonl"].write((json.dumps(chunk.line) + "\n").encode())
                for f in files.values():
                    f.flush()
                self.chunks += 1
                self.frames += len(chunk.frames)
            if container is not None:
                container.mux(stream.encode())  # flush the encoder
                container.close()
                container = None
                os.replace(self.folder / "preview.mp4.part", self.folder / "preview.mp4")
        except OSError as exc:
            self.error = "disk full" if exc.errno == errno.ENOSPC else f"cannot write the recording: {exc}"
            log.error("recording of session %s failed: %s", self.folder.name[:8], self.error)
        except Exception as exc:  # an encoder failure must not take the server down
            self.error = f"cannot write the recording: {exc}"
            log.exception("recording of session %s failed", self.folder.name[:8])
        finally:
            for f in files.values():
                f.close()
            if container is not None:
                container.close()
            while self._queue.qsize():  # the producer may still add after a failure
                self._queue.get_nowait()

    def _prompt_changes(self) -> list[dict[str, Any]]:
        """``[{"chunk", "prompt"}]`` read back from ``chunks.jsonl`` (nothing of it is kept in memory)."""
        changes = []
        path = self.folder / "chunks.jsonl"
        if path.exists():
            with open(path) as f:
                for text in f:
                    line = json.loads(text)
                    if "prompt" in line:
                        changes.append({"chunk": line["chunk"], "prompt": line["prompt"]})
        return changes

    def _write_meta(self) -> None:
        write_atomic(self.folder / "meta.json", json.dumps(self.meta, indent=1).encode())


class Recorder:
    """Records every session that streams: opened at its first chunk, closed by its end hook.

    ``on_ended`` (the job queue's enqueue) is called with the session id and the recording error, if
    any, once the recording is complete on disk.
    """

    def __init__(self, store: RecordingStore, info: EngineInfo, on_ended: Callable[[str, str | None], None]) -> None:
        self.store = store
        self.info = info
        self.on_ended = on_ended
        self.recordings: dict[str, SessionRecording] = {}
        self._prompts: dict[str, str] = {}  # the prompt of each recording's last chunk

    async def chunk(self, session: Session, result: ChunkResult, chunk: ChunkInput) -> None:
        """The engine loop delivered ``result`` to ``session``: append it to the recording."""
        recording = self.recordings.get(session.id)
        if recording is None:
            recording = await asyncio.to_thread(self._open, session, result)
            self.recordings[session.id] = recording
        line: dict[str, Any] = {
            "chunk": result.chunk_index, "first_frame": result.first_frame, "frames": len(result.frames),
            "latent_frames": 0 if result.latents is None else int(result.latents.shape[1]),
            "t": round(time.time() - session.created_wall, 3), "input_seq": chunk.input_seq,
            "input_age": None if chunk.input_time is None else round(time.monotonic() - chunk.input_time, 3),
            "keys": sorted(chunk.keys), "mouse": list(chunk.mouse),
        }
        if self._prompts.get(session.id) != session.prompt:
            line["prompt"] = self._prompts[session.id] = session.prompt
        await recording.add(result.frames, result.latents, chunk.poses, line)

    def _open(self, session: Session, first: ChunkResult) -> SessionRecording:
        latents = first.latents
        meta: dict[str, Any] = {
            "session_id": session.id, "token_sha256": token_hash(session.token), "model": self.info.model,
            "width": self.info.width, "height": self.info.height, "fps": self.info.fps, "seed": session.seed,
            "created_at": session.created_wall, "ended_at": None,
            "poses": {"file": "poses.f64", "dtype": "float64", "shape": ["frames", 4, 4]},
            "latents": None if latents is None else {
                "file": "latents.f16", "dtype": "float16", "layout": "T,C,h,w", "channels": int(latents.shape[0]),
                "height": int(latents.shape[2]), "width": int(latents.shape[3]), "frames": None,
            },
            "preview": None,
        }
        return SessionRecording(self.store.folder(session.id), meta, session.image)

    async def end(self, record: SessionRecord) -> None:
        """End hook: finish the session's recording, then hand it to the refinement queue."""
        recording = self.recordings.pop(record.session_id, None)
        self._prompts.pop(record.session_id, None)
        if recording is None:
            return  # never streamed: nothing recorded
        await recording.close({"ended_at": record.ended_at, "end_reason": record.reason})
        await asyncio.to_thread(self.on_ended, record.session_id, recording.error)

    async def close_all(self) -> None:
        """Close recordings still open (their sessions' end hooks did not run)."""
        for session_id, recording in list(self.recordings.items()):
            await recording.close({"ended_at": time.time(), "end_reason": "shutdown"})
            del self.recordings[session_id]
