"""The recorder's writer thread: the live preview's fragments follow the chunks, and a write failure (a full
disk) marks the recording broken without ever stalling the producer (the engine loop awaits ``add``)."""

from __future__ import annotations

import asyncio
import builtins
import errno

import av
import pytest

from stream_server import recording as recording_module
from stream_server.recording import MAX_QUEUED_CHUNKS, RecordingStore, SessionRecording, _mp4_boxes

from .helpers import CHUNK_FRAMES, FPS, count_frames, record_chunks, recording_meta

pytestmark = pytest.mark.asyncio

SESSION = "recorded-0123456789"


async def test_finished_preview_is_a_plain_mp4_with_its_index_first(tmp_path):
    """While recording, the preview is fragmented (what crash recovery relies on, test_recovery.py); once
    closed it is remuxed, packets copied, into a plain MP4 with ``moov`` up front, so browsers know its
    duration and seek at once."""
    folder = RecordingStore(tmp_path).folder(SESSION)
    recording = SessionRecording(folder, recording_meta(SESSION, "tok"), None)
    await record_chunks(recording, 3)
    await recording.close({"ended_at": 1.0, "end_reason": "deleted"})
    kinds = [kind for kind, _, _ in _mp4_boxes(folder / "preview.mp4")]
    assert kinds[:2] == [b"ftyp", b"moov"] and b"moof" not in kinds and b"mdat" in kinds
    assert count_frames(folder / "preview.mp4") == 3 * CHUNK_FRAMES
    with av.open(str(folder / "preview.mp4")) as container:
        assert container.duration and abs(container.duration / 1e6 - 3 * CHUNK_FRAMES / FPS) < 0.1
    assert not (folder / "preview.mp4.tmp").exists() and not (folder / "preview.mp4.part").exists()


async def test_a_failed_remux_keeps_the_fragmented_preview(tmp_path):
    broken = tmp_path / "preview.mp4.part"
    broken.write_bytes(b"not an mp4")
    recording_module.remux_to_faststart(broken, tmp_path / "preview.mp4.tmp")
    assert broken.read_bytes() == b"not an mp4" and not (tmp_path / "preview.mp4.tmp").exists()


async def test_disk_full_drops_later_chunks_without_stalling_the_producer(tmp_path, monkeypatch):
    def full_open(path, mode="r", *args, **kwargs):
        if "a" in mode:  # the appended chunk files
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(recording_module, "open", full_open, raising=False)
    folder = RecordingStore(tmp_path).folder(SESSION)
    recording = SessionRecording(folder, recording_meta(SESSION, "tok"), None)
    await asyncio.wait_for(record_chunks(recording, 3 * MAX_QUEUED_CHUNKS), timeout=20)
    await recording.close({"ended_at": 1.0, "end_reason": "deleted"})
    meta = RecordingStore(tmp_path).read_meta(SESSION)
    assert meta["recording_error"] == "disk full" and meta["preview"] is None
