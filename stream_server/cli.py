"""The ``sana-wm-stream`` command line. Every failure ends in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_info(args: argparse.Namespace) -> int:
    from world_model.checkpoint import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(info.__dict__, indent=2, default=str))
    else:
        print("\n".join(info.lines()))
    return 0


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that choose and place the model (shared by the commands that run it)."""
    parser.add_argument("--model", default="demo",
                        help="built-in preset: demo (default; trained weights ship with the package), tiny, sana-wm-streaming, ... (random weights)")
    parser.add_argument("--random-weights", action="store_true", help="random weights even for a preset that ships trained ones (demo)")
    parser.add_argument("--checkpoint", help="a downloaded SANA-WM_streaming release folder")
    parser.add_argument("--text-encoder", help="Gemma-2-2B-IT folder for --checkpoint (default: found beside it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp8"],
                        help="default: fp32 on CPU, bf16 on CUDA; fp8: bf16 with FP8 block linears (modelopt)")
    parser.add_argument("--chunk-frames", type=int, default=3, choices=[1, 2, 3], help="latent frames per chunk")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (GPU; slow first chunks)")
    parser.add_argument("--threads", type=int, help="CPU threads of the model (default: torch's; serve on the CPU: all "
                                                    "but one of the cores, which is left to video encoding and the network)")


def engine_from_args(args: argparse.Namespace, threads: int | None = None):
    """Build the engine the flags ask for; every failure becomes a one-line ``CliError``. ``threads`` is the
    default for ``--threads``."""
    from world_model.checkpoint import CheckpointError
    from world_model.engine import build_engine
    from world_model.engine_api import EngineError

    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    threads = args.threads if args.threads is not None else threads  # checked by build_engine
    try:
        return build_engine(args.model, args.checkpoint, device=args.device, dtype=dtype, text_encoder=args.text_encoder,
                            chunk_frames=args.chunk_frames, compile=args.compile, random_weights=args.random_weights,
                            threads=threads)
    except (CheckpointError, EngineError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    except RuntimeError as exc:  # e.g. a CUDA device that is not there
        raise CliError(f"cannot start the model on {args.device}: {str(exc).splitlines()[0]}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stream_server.generate import check_seconds, generate_video
    from world_model.controls import parse_actions
    from world_model.engine import load_image
    from world_model.engine_api import EngineError

    from world_model.start_scenes import START_SCENES, find_scene, render_scene

    try:  # cheap checks first, before any model is built
        parse_actions(args.actions)
        check_seconds(args.seconds, 16)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    scene = find_scene(args.scene) if args.scene else None
    if args.scene and scene is None:
        raise CliError(f"unknown scene {args.scene!r}; start scenes: {', '.join(s.id for s in START_SCENES)}")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliError(f"output folder {out.parent} does not exist")
    try:
        image = load_image(args.image) if args.image else None
        engine = engine_from_args(args)
        if scene is not None:
            image = render_scene(scene, engine.info.width, engine.info.height)
        frames = generate_video(engine, out, prompt=args.prompt, actions=args.actions, seconds=args.seconds, image=image, seed=args.seed, progress=not args.quiet)
    except EngineError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {out} ({frames} frames, {engine.info.width}x{engine.info.height} at {engine.info.fps} fps)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import math

    from stream_server.bench import as_json, batch_sizes, measure

    if not 1 <= args.sessions <= 256:
        raise CliError(f"--sessions must be in 1..256; got {args.sessions}")
    if not 0 < args.seconds <= 600:
        raise CliError(f"--seconds must be in (0, 600]; got {args.seconds:g}")
    engine = engine_from_args(args)
    chunk_s = engine.info.chunk_pixel_frames / engine.info.fps
    result = measure(engine, batch_sizes(args.sessions), chunks=max(1, math.ceil(args.seconds / chunk_s)))
    print(json.dumps(as_json(result)) if args.json else result.table())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_sessions < 1:
        raise CliError("--max-sessions must be at least 1")
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535; got {args.port}")
    for name in ("idle_timeout", "grace_period"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be positive")

    from pathlib import Path

    from aiohttp import web

    from .app import create_app
    from .config import ServerConfig

    ttl, max_bytes = retention_from_args(args)
    no_refiner = serve_no_refiner(args)
    config = ServerConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions, data_dir=Path(args.data_dir),
        ice_servers=tuple(args.ice_server), allow_origins=tuple(args.allow_origin),
        idle_timeout=args.idle_timeout, grace_period=args.grace_period, replay_ttl=ttl, max_replay_bytes=max_bytes,
        no_refiner=no_refiner,
    )
    engine = engine_from_args(args, threads=serve_threads(args.device))  # the one place the server reaches torch
    info = engine.info
    logger = logging.getLogger("stream_server")
    logger.info(
        "serving %s (%dx%d @ %d fps, %s %s) on http://%s:%d", info.model, info.width, info.height, info.fps,
        info.device, info.dtype, args.host, args.port,
    )
    if no_refiner is not None:
        logger.warning("%s: sessions are recorded with their live preview and their replays are preview-only", no_refiner)
    worker = None if args.no_refine or no_refiner is not None else start_refine_worker(args)
    try:
        web.run_app(create_app(engine, config), host=args.host, port=args.port, print=None)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait()
    return 0


def retention_from_args(args: argparse.Namespace) -> tuple[float | None, int | None]:
    """(ttl seconds, max bytes) from ``--replay-ttl`` and ``--max-replay-gb``."""
    if args.replay_ttl is not None and args.replay_ttl <= 0:
        raise CliError("--replay-ttl must be positive")
    if args.max_replay_gb is not None and args.max_replay_gb <= 0:
        raise CliError("--max-replay-gb must be positive")
    return args.replay_ttl, None if args.max_replay_gb is None else int(args.max_replay_gb * 1e9)


def serve_threads(device: str) -> int | None:
    """The model's CPU threads when serving: on the CPU all but one of the cores this process may run on. The
    server encodes every session's video and runs WebRTC on the same cores (and on a laptop the browser decodes
    there too); a model that takes every core stalls whenever one of them is busy with that (benchmarks/README.md,
    "CPU threads when serving"). None (torch's default) on a GPU."""
    if device != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def serve_no_refiner(args: argparse.Namespace) -> str | None:
    """Why no refiner can be built for the model ``serve`` runs (its replays are then preview-only), or None."""
    from world_model.engine import SHIPPED_WEIGHTS

    from .refining import refiner_unavailable

    trained = args.model in SHIPPED_WEIGHTS and not args.random_weights
    return refiner_unavailable(args.model, args.checkpoint, trained=trained)


def start_refine_worker(args: argparse.Namespace):
    """The refinement worker of ``serve``: ``refine --follow --low-priority`` as a child process (see
    :mod:`stream_server.refining` for the priority policy); None when no refiner is available."""
    import subprocess

    if serve_no_refiner(args) is not None:
        return None
    command = [sys.executable, "-m", "stream_server.cli", "refine", "--data-dir", args.data_dir, "--follow", "--low-priority",
               "--yield-to-live", "--model", args.model, "--device", args.refiner_device or args.device]
    for flag, value in (("--checkpoint", args.checkpoint), ("--dtype", args.dtype), ("--replay-ttl", args.replay_ttl),
                        ("--max-replay-gb", args.max_replay_gb)):
        if value is not None:
            command += [flag, str(value)]
    return subprocess.Popen(command)


def cmd_refine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .jobs import JobQueue
    from .recording import RecordingStore, valid_session_id
    from .replays import Retention, apply_retention

    if args.session_id is not None and not valid_session_id(args.session_id):
        raise CliError(f"not a session id: {args.session_id!r}")
    if args.lease <= 0:
        raise CliError("--lease must be positive")
    ttl, max_bytes = retention_from_args(args)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise CliError(f"--data-dir {data_dir} does not exist")
    if args.low_priority:
        from .refining import lower_priority

        lower_priority()
    store, queue = RecordingStore(data_dir), JobQueue(data_dir)
    apply_retention(store, queue, Retention(ttl, max_bytes))
    if args.session_id is not None and queue.get(args.session_id) is None:
        meta = store.read_meta(args.session_id) or {}
        if meta.get("preview_only"):
            raise CliError(f"session {args.session_id} is preview-only, not refined: {meta['preview_only']}")
        raise CliError(f"no refinement job for session {args.session_id}")
    from .refining import RefineWorker, RefinerUnavailable, load_refiner

    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    try:
        refine, vae = load_refiner(args.model, args.checkpoint, device=args.device, dtype=dtype)
    except (RefinerUnavailable, ValueError) as exc:
        raise CliError(str(exc)) from None
    from .gate import DeviceGate

    gate = DeviceGate(data_dir) if args.yield_to_live else None
    worker = RefineWorker(store, queue, refine, vae, model=args.model, lease_seconds=args.lease, gate=gate)
    finished = worker.run(args.session_id, follow=args.follow)
    print(f"refined {finished} session(s)")
    return 0


def add_retention_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replay-ttl", type=float, metavar="SECONDS", help="delete replays this long after their session ended")
    parser.add_argument("--max-replay-gb", type=float, metavar="N", help="keep replays within N GB, deleting the oldest first")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sana-wm-stream", description="Live SANA-WM world streaming server and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="check a checkpoint folder and print what it holds")
    info.add_argument("--checkpoint", required=True, help="release folder, transformer/ folder or weights file")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="offline streaming generation to an MP4")
    start = gen.add_mutually_exclusive_group()
    start.add_argument("--image", help="start image (any size: resized and centre-cropped; default: the model's start scene)")
    start.add_argument("--scene", help="start from this named start scene (GET /v1/scenes; e.g. spheres, pillar)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--actions", required=True, help="action script, e.g. w-16,d-16,none-8 (the last segment repeats)")
    gen.add_argument("--seconds", type=float, required=True, help="length of the video")
    gen.add_argument("-o", "--output", required=True, help="output .mp4")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="measure chunk latency, sessions at real time and memory (built-in presets need no download)")
    bench.add_argument("--sessions", type=int, default=1, help="measure batches of 1, 2, 4, ... up to this many sessions")
    bench.add_argument("--seconds", type=float, default=6.0, help="video seconds timed per batch size")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(bench)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="run the streaming server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--max-sessions", type=int, default=8, help="live sessions at once (default 8)")
    serve.add_argument("--data-dir", default="data", help="where recordings and replays go (default ./data)")
    serve.add_argument("--ice-server", action="append", default=[], metavar="URL",
                       help="STUN/TURN server for WebRTC, e.g. stun:host:3478 or turn:user:pass@host:3478 (repeatable); none: host candidates only")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="origin allowed to call the API cross-site (repeatable, '*' for any); default same-origin")
    serve.add_argument("--idle-timeout", type=float, default=300.0, help="end a session after this many seconds without a control message")
    serve.add_argument("--grace-period", type=float, default=30.0, help="seconds a disconnected session waits for its client to reconnect")
    serve.add_argument("--no-refine", action="store_true", help="record and queue sessions, but run no refinement worker")
    serve.add_argument("--refiner-device", help="device of the refinement worker (default: --device; it then yields to live steps)")
    add_retention_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    refine = sub.add_parser("refine", help="run queued refinements of recorded sessions (also runs inside serve)")
    refine.add_argument("session_id", nargs="?", metavar="SESSION_ID", help="refine only this session (default: every queued one)")
    refine.add_argument("--data-dir", default="data", help="the serve data dir (default ./data)")
    refine.add_argument("--follow", action="store_true", help="keep polling for new jobs instead of exiting when none is left")
    refine.add_argument("--low-priority", action="store_true", help="use only CPU time other processes leave free")
    refine.add_argument("--yield-to-live", action="store_true",
                        help="before each refiner block, wait for a gap in the live sessions of the serve sharing --data-dir")
    refine.add_argument("--lease", type=float, default=30.0, metavar="SECONDS", help="job lease; a dead worker's job is retaken after it")
    refine.add_argument("--model", default="tiny", help="the model the sessions were recorded with (default: tiny)")
    refine.add_argument("--checkpoint", help="the release folder the sessions were recorded with")
    refine.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    refine.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    add_retention_args(refine)
    refine.set_defaults(func=cmd_refine)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"sana-wm-stream {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        print(f"sana-wm-stream {args.command}: error: missing dependency {exc.name!r}; install the project (and the 'gpu' extra for GPU features)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
