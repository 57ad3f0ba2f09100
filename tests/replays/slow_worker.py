"""A refinement worker whose refine step is slow (the stand-in refiner, ``--delay`` seconds per block), run
as ``python -m tests.replays.slow_worker DATA_DIR`` by the crash test. Used only by tests."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore
from stream_server.refining import RefineWorker
from world_model.vae import VideoVAE

from .helpers import identity_refine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lease", type=float, default=1.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    refine = functools.partial(identity_refine, delay=args.delay)
    worker = RefineWorker(RecordingStore(args.data_dir), JobQueue(args.data_dir), refine, VideoVAE.from_preset("tiny", seed=0),
                          model="tiny", lease_seconds=args.lease)
    print(f"finished {worker.run()}", flush=True)


if __name__ == "__main__":
    main()
