"""Recording of live sessions into ``<data-dir>/sessions/<session_id>/``, written as the session runs.

One folder per session that produced at least one chunk::

    meta.json         what the session was: model, size, fps, seed, times, prompt changes (with the chunk
                      and the first latent frame they took effect at), the token's SHA-256 (never the
                      token), file layout
    start.png         the start image as uploaded (absent when none was given)
    chunks.jsonl      one line per chunk, appended: frames, latent frames (and the first one's index),
                      timing, the input that drove it, a new prompt
    poses.f64         per-frame camera-to-world poses, appended: raw float64 (frames, 4, 4)
    latents.f16       the clean Stage-1 latents, appended: raw float16 (T, C, h, w), one latent frame after
                      another, so that a memory map reads the whole session without holding it
    preview.mp4.part  the live-quality H.264 video of the delivered frames while the session runs, as a
                      fragmented MP4 (a fragment per keyframe, one at a chunk start about every second, each
                      flushed to the file when complete); at the end, once the encoder is flushed and
                      closed, remuxed (packets copied) into a plain MP4 with its index first and renamed to
                      preview.mp4; a crash leaves the fragmented file, which recovery keeps

All file writing and H.264 encoding happen on one writer thread per session, fed through a short queue,
so the event loop never waits on the disk or the encoder and nothing of a long session stays in memory.
Every chunk is written whole (video, latents, poses, line) by that one thread, so the files agree on how
many chunks were recorded, except for a crash's loose ends: the encoder and the muxer hold the newest
frames until the next fragment is complete, and a killed process leaves a partial line, pose or latent.

``meta.json`` with ``ended_at`` and ``frames`` set is the mark of a finished recording. A server killed
mid-session (SIGKILL, power loss) leaves folders without it; :func:`recover_recordings`, run by the server
at start before any session records, finishes them: it keeps the chunks that every file holds whole
(the preview's complete fragments included), cuts the rest, marks the recording ended with reason
``recovered`` and queues it for refinement.

A finished recording of a model the server has no refiner for (``unrefined``: model -> why, e.g. the
trained ``demo`` model) gets no refinement job: ``meta.json`` says why in ``preview_only``, and its replay is
final with only ``preview.mp4``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
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
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from world_model.engine_api import ChunkResult, EngineInfo

from .sessions import ChunkInput, Session, SessionRecord

if TYPE_CHECKING:
    from .jobs import JobQueue

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")  # what a session id may look like (token_urlsafe)
MAX_QUEUED_CHUNKS = 8  # chunks waiting for a writer thread before the engine loop waits for it
PREVIEW_OPTIONS = {"crf": "23", "preset": "veryfast"}  # live quality, cheap to encode
# The live preview's encoder makes keyframes (IDR) only where the writer asks for them, at chunk starts, and
# its muxer writes a fragment per keyframe and flushes it to the file: a crash leaves whole chunks playable.
PREVIEW_KEYFRAMES = {"forced-idr": "1", "x264-params": "keyint=infinite:scenecut=0"}
PREVIEW_MUXER = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


def remux_to_faststart(path: Path, scratch: Path) -> None:
    """Rewrite the finished fragmented preview at ``path`` as a plain MP4 with its index up front (packets
    copied, nothing re-encoded), so that browsers know its duration and seek at once. ``scratch`` is the
    temporary file; on any failure the fragmented file stays as it is (it plays everywhere; seeking is
    just slower)."""
    import av

    try:
        with av.open(str(path)) as source, av.open(str(scratch), mode="w", format="mp4", options={"movflags": "faststart"}) as target:
            video = source.streams.video[0]
            out = target.add_stream_from_template(video)
            for packet in source.demux(video):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = out
                target.mux(packet)
        os.replace(scratch, path)
    except (OSError, av.FFmpegError, ValueError) as exc:
        log.warning("kept the fragmented preview %s (remux failed: %s)", path, exc)
        scratch.unlink(missing_ok=True)
KEYFRAME_SECONDS = 1.0  # at least this much video between two keyframes (the first frame of a chunk)
POSE_BYTES = 16 * 8  # one float64 4x4 pose


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


def prompt_schedule(meta: dict[str, Any]) -> list[tuple[int, str]]:
    """A recording's prompts as ``[(first latent frame, prompt)]`` (what the refiner conditions on) from the
    prompt changes in its ``meta.json``."""
    changes = meta.get("prompts") or []
    if not changes:
        raise ValueError("the recording has no prompt")
    schedule: dict[int, str] = {}
    for change in changes:
        frame = change.get("latent_frame")
        if frame is None:  # recorded before latent_frame was: chunk 0 holds 1 + n latent frames, later ones n
            per_chunk = (meta["latents"]["frames"] - 1) // max(1, meta["chunks"])
            frame = 0 if change["chunk"] == 0 else 1 + per_chunk * change["chunk"]
        schedule[int(frame)] = change["prompt"]  # a later change at the same frame wins
    return sorted(schedule.items())


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
        """Queue one chunk; waits (without blocking the event loop) while the writer is far behind. After a
        write failure the chunk is dropped (the writer has stopped: waiting for it would stall the engine loop)."""
        while self._queue.qsize() >= MAX_QUEUED_CHUNKS and self._writing:
            await asyncio.sleep(0.01)
        if self._writing:
            self._queue.put(_Chunk(frames, latents, poses, line))

    @property
    def _writing(self) -> bool:
        return not self._closed and self.error is None and self._thread.is_alive()

    async def close(self, ended: dict[str, Any], *, preview_only: str | None = None) -> None:
        """Write what is queued, close the video and finish ``meta.json`` with ``ended``; ``preview_only``:
        why the recording will not be refined (kept only when the recording is whole)."""
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
            if preview_only is not None:
                self.meta["preview_only"] = preview_only
        await asyncio.to_thread(self._write_meta)

    # -- the writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        import av

        container = None
        stream = None
        files: dict[str, Any] = {}
        keyframe_at: int | None = None  # the video frame of the last keyframe
        try:
            while (chunk := self._queue.get()) is not None:
                if self.error is not None:
                    continue  # drain and drop: the recording is already broken
                if container is None:
                    container = av.open(str(self.folder / "preview.mp4.part"), mode="w", format="mp4", options=PREVIEW_MUXER)
                    stream = container.add_stream("libx264", rate=Fraction(self.meta["fps"]))
                    stream.width, stream.height, stream.pix_fmt = self.meta["width"], self.meta["height"], "yuv420p"
                    stream.options = dict(PREVIEW_OPTIONS, **PREVIEW_KEYFRAMES)
                    files = {name: open(self.folder / name, "ab") for name in ("chunks.jsonl", "poses.f64", "latents.f16")}
                key = keyframe_at is None or self.frames - keyframe_at >= KEYFRAME_SECONDS * self.meta["fps"]
                keyframe_at = self.frames if key else keyframe_at
                for i, rgb in enumerate(chunk.frames):
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                    if key and i == 0:
                        frame.pict_type = av.video.frame.PictureType.I
                    container.mux(stream.encode(frame))
                latent_frames = 0 if chunk.latents is None else int(chunk.latents.shape[1])
                line = {**chunk.line, "latent_frames": latent_frames, "first_latent": self.latent_frames}
                if chunk.latents is not None:
                    files["latents.f16"].write(np.ascontiguousarray(chunk.latents.astype(np.float16).transpose(1, 0, 2, 3)).tobytes())
                    self.latent_frames += latent_frames
                files["poses.f64"].write(np.ascontiguousarray(chunk.poses, dtype=np.float64).tobytes())
                files["chunks.jsonl"].write((json.dumps(line) + "\n").encode())
                for f in files.values():
                    f.flush()
                self.chunks += 1
                self.frames += len(chunk.frames)
            if container is not None:
                container.mux(stream.encode())  # flush the encoder
                container.close()
                container = None
                remux_to_faststart(self.folder / "preview.mp4.part", self.folder / "preview.mp4.tmp")
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
                with contextlib.suppress(Exception):  # closing after a failure may fail again
                    container.close()
            while self._queue.qsize():  # the producer may still add after a failure
                self._queue.get_nowait()

    def _prompt_changes(self) -> list[dict[str, Any]]:
        """``[{"chunk", "latent_frame", "prompt"}]`` read back from ``chunks.jsonl`` (none of it is kept in memory)."""
        return _prompt_changes(_read_lines(self.folder / "chunks.jsonl")[0])

    def _write_meta(self) -> None:
        write_atomic(self.folder / "meta.json", json.dumps(self.meta, indent=1).encode())


class Recorder:
    """Records every session that streams: opened at its first chunk, closed by its end hook.

    ``on_ended`` (the job queue's enqueue) is called with the session id and the recording error, if
    any, once the recording is complete on disk; not for a whole recording of a model in ``unrefined``
    (model -> why it has no refiner), which is marked preview-only instead.
    """

    def __init__(self, store: RecordingStore, info: EngineInfo, on_ended: Callable[[str, str | None], None], *,
                 unrefined: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.info = info
        self.on_ended = on_ended
        self.preview_only = (unrefined or {}).get(info.model)  # why this server's recordings are not refined
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
        await self._finish(record.session_id, recording, {"ended_at": record.ended_at, "end_reason": record.reason})

    async def close_all(self) -> None:
        """Close recordings still open (their sessions' end hooks did not run)."""
        for session_id, recording in list(self.recordings.items()):
            del self.recordings[session_id]
            await self._finish(session_id, recording, {"ended_at": time.time(), "end_reason": "shutdown"})

    async def _finish(self, session_id: str, recording: SessionRecording, ended: dict[str, Any]) -> None:
        await recording.close(ended, preview_only=self.preview_only)
        if recording.meta.get("preview_only"):
            log.info("session %s: replay is preview-only (%s)", session_id[:8], self.preview_only)
            return
        await asyncio.to_thread(self.on_ended, session_id, recording.error)


# -- reading back, and recovery after a crash -------------------------------------------------------------


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The whole lines of ``chunks.jsonl`` (up to the first torn or malformed one) and the byte offset after each."""
    lines: list[dict[str, Any]] = []
    ends: list[int] = []
    if not path.exists():
        return lines, ends
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the writer died mid-line
            try:
                line = json.loads(raw)
            except ValueError:
                break
            if not isinstance(line, dict) or not isinstance(line.get("frames"), int):
                break
            offset += len(raw)
            lines.append(line)
            ends.append(offset)
    return lines, ends


def _prompt_changes(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"chunk", "latent_frame", "prompt"}]``: the lines that changed the prompt, with their first latent frame."""
    return [{"chunk": line["chunk"], "latent_frame": line.get("first_latent"), "prompt": line["prompt"]}
            for line in lines if "prompt" in line]


def _mp4_boxes(path: Path) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, size) of the complete top-level boxes of an MP4, up to the first incomplete one."""
    size_of_file = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size_of_file:
            f.seek(offset)
            header = f.read(16)
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if size == 1 and len(header) == 16:  # 64-bit size
                size = int.from_bytes(header[8:16], "big")
            if size < 8 or offset + size > size_of_file:  # torn, or size 0 ("to the end": never complete here)
                return
            yield kind, offset, size
            offset += size


def _preview_cuts(path: Path) -> dict[int, int]:
    """Where a fragmented preview may be cut: ``{frames before the cut: bytes kept}`` at each boundary of its
    complete fragments (``{0: header}`` included), after cutting off an incomplete tail; empty when not even
    its header (``ftyp``, ``moov``) is complete."""
    import av

    header_end: int | None = None
    fragments: list[int] = []  # offsets of the moof boxes whose mdat is complete
    end = 0  # bytes of the file that are whole boxes (a moof counts once its mdat is whole)
    moof: int | None = None
    for kind, offset, size in _mp4_boxes(path):
        if kind == b"moov":
            header_end = end = offset + size
        elif kind == b"moof":
            moof = offset
        elif kind == b"mdat" and moof is not None:
            fragments.append(moof)
            moof, end = None, offset + size
        elif moof is None and header_end is not None:
            end = offset + size  # an index box after the fragments (mfra), or free space
    if header_end is None:
        return {}
    if path.stat().st_size > end:
        _truncate(path, end)
    cuts = {0: header_end}
    frames, current = 0, -1
    try:
        with av.open(str(path)) as container:
            for packet in container.demux(video=0):  # decoding order; every fragment starts a closed GOP
                if not packet.size:
                    continue
                fragment = bisect.bisect_right(fragments, packet.pos) - 1
                if fragment > current:  # the first frame of a fragment
                    cuts[frames], current = fragments[fragment], fragment
                frames += 1
    except (av.FFmpegError, OSError) as exc:
        log.warning("%s: cannot read the preview (%s)", path, exc)
        return {}
    cuts[frames] = end
    return cuts


def _truncate(path: Path, size: int) -> None:
    with open(path, "rb+") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def recover_recordings(store: RecordingStore, jobs: JobQueue, *, unrefined: Mapping[str, str] | None = None) -> list[str]:
    """Finish the recordings a killed server left open and queue every recording that has no job; returns the
    ids of the recordings it finished. Idempotent (a second run changes nothing).

    A whole recording of a model in ``unrefined`` (model -> why there is no refiner for it) is marked
    preview-only instead of queued; so is one whose job is still queued and was never started (queued by an
    earlier version that queued every recording).

    The server runs this at start, before any session records: a live session's folder must not be touched,
    so no other server may be recording into the same data dir (refine workers sharing it are fine).
    """
    unrefined = unrefined or {}
    queued = {job.session_id: job for job in jobs.jobs()}
    recovered = []
    for session_id in sorted(store.session_ids()):
        meta = store.read_meta(session_id)
        if meta is None:  # killed before its first meta.json: no chunk was written, nothing to replay
            log.warning("session folder %s has no meta.json; left as it is", session_id[:8])
            continue
        if meta.get("ended_at") is None or meta.get("frames") is None:
            try:
                meta = _recover(store.folder(session_id), meta)
            except Exception:  # one unreadable folder must not keep the server from starting
                log.exception("cannot recover the recording of session %s; left as it is", session_id[:8])
                continue
            recovered.append(session_id)
            log.info("recovered the recording of session %s: %d chunks, %d frames%s", session_id[:8], meta["chunks"],
                     meta["frames"], f" ({meta['recording_error']})" if meta["recording_error"] else "")
        job, reason = queued.get(session_id), unrefined.get(meta.get("model"))
        if reason is not None and not meta.get("recording_error") and not meta.get("preview_only") and (
                job is None or (job.state == "queued" and job.attempts == 0)):
            if job is not None:
                jobs.delete(session_id)  # before the mark: a crash in between leaves it unqueued, marked next time
            meta["preview_only"] = reason
            write_atomic(store.folder(session_id) / "meta.json", json.dumps(meta, indent=1).encode())
            log.info("session %s: replay is preview-only (%s)", session_id[:8], reason)
        elif job is None and not meta.get("preview_only"):
            jobs.enqueue(session_id, meta.get("recording_error"))
    return recovered


def _recover(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Cut an unfinished recording to the chunks all its files hold whole and mark it ended; the new meta."""
    data = [folder / name for name in ("chunks.jsonl", "poses.f64", "latents.f16", "preview.mp4.part", "preview.mp4")]
    last_write = max((p.stat().st_mtime for p in data if p.exists()), default=meta.get("created_at") or time.time())
    lines, line_ends = _read_lines(folder / "chunks.jsonl")
    # frame_ends[k], latent_ends[k]: video and latent frames of the first k chunks
    frame_ends, latent_ends = [0], [0]
    for line in lines:
        frame_ends.append(frame_ends[-1] + int(line["frames"]))
        latent_ends.append(latent_ends[-1] + int(line.get("latent_frames", 0)))
    poses = folder / "poses.f64"
    count = min(len(lines), bisect.bisect_right(frame_ends, _size(poses) // POSE_BYTES) - 1)
    latent = meta.get("latents")
    latent_bytes = 0
    if latent is not None:
        latent_bytes = latent["channels"] * latent["height"] * latent["width"] * 2  # one float16 latent frame
        count = min(count, bisect.bisect_right(latent_ends, _size(folder / latent["file"]) // latent_bytes) - 1)
    preview = folder / "preview.mp4.part"
    if not preview.exists():
        preview = folder / "preview.mp4"  # closed cleanly, killed before meta.json was finished
    cuts = _preview_cuts(preview) if preview.exists() else {}
    while count > 0 and frame_ends[count] not in cuts:
        count -= 1  # the preview has no fragment boundary there (or lacks these frames)

    # Cut every file to `count` chunks (idempotent: a recovery killed midway is simply run again).
    for path, size in ((folder / "chunks.jsonl", line_ends[count - 1] if count else 0),
                       (poses, frame_ends[count] * POSE_BYTES),
                       (folder / latent["file"] if latent is not None else None, latent_ends[count] * latent_bytes)):
        if path is not None and path.exists() and _size(path) > size:
            _truncate(path, size)
    if count:
        if _size(preview) > cuts[frame_ends[count]]:
            _truncate(preview, cuts[frame_ends[count]])
        os.replace(preview, folder / "preview.mp4")
    else:
        for path in (folder / "preview.mp4.part", folder / "preview.mp4"):
            path.unlink(missing_ok=True)

    meta.update(ended_at=last_write, end_reason="recovered", recovered_at=time.time(), chunks=count,
                frames=frame_ends[count], prompts=_prompt_changes(lines[:count]),
                recording_error=None if count else "the server stopped before a whole chunk of the session was saved",
                preview="preview.mp4" if count else None)
    if latent is not None:
        latent["frames"] = latent_ends[count]
    write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())
    return meta


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
