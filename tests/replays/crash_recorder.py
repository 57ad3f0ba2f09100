"""A server's recorder, to be killed: records ``--chunks`` chunks of a session into DATA_DIR, prints ``recorded``
once the writer thread has written them all, then waits (never closing the recording) until the crash test
SIGKILLs it. Run as ``python -m tests.replays.crash_recorder DATA_DIR SESSION_ID``. Used only by tests."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from stream_server.recording import RecordingStore, SessionRecording

from .helpers import CHUNK_FRAMES, record_chunks, recording_meta


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("session_id")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--frames", type=int, default=CHUNK_FRAMES, help="video frames per chunk")
    parser.add_argument("--latents", type=int, default=3, help="latent frames per chunk after chunk 0")
    parser.add_argument("--prompts", default='{"0": "a harbour"}', help="JSON {chunk: prompt}")
    parser.add_argument("--model", default="tiny", help="the model named in meta.json")
    args = parser.parse_args()
    prompts = {int(chunk): text for chunk, text in json.loads(args.prompts).items()}
    folder = RecordingStore(args.data_dir).folder(args.session_id)
    recording = SessionRecording(folder, recording_meta(args.session_id, "tok", args.model), None)
    await record_chunks(recording, args.chunks, frames=args.frames, latents=args.latents, prompts=prompts)
    while recording.chunks < args.chunks:  # the writer thread has every chunk on disk (flushed, not closed)
        await asyncio.sleep(0.01)
    print("recorded", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    asyncio.run(main())
