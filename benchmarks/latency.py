"""Input -> frame latency and received frame rate for 1, 2, 4, ... concurrent WebRTC sessions.

    .venv/bin/python benchmarks/latency.py [--sessions 1,2,4] [--seconds 20] [--json] [--url URL]

Without ``--url`` it starts ``sana-wm-stream serve --model MODEL`` (default ``demo``, the shipped trained model; CPU)
as a **subprocess** on a free loopback port, as a user runs it, and stops it at the end; the clients run
in this process (aiortc via :mod:`stream_server.sdk`), so on a small machine they compete with the server
for the same cores, as a browser on the same machine would. With ``--url`` it measures a server that is
already running (its ``--max-sessions`` must admit the largest count).

For each session count: create the sessions, connect them together, wait for everyone's first frame,
then for ``--seconds``:

* each session sends ``input`` messages with a new key set at random times (gaps uniform in
  ``--gap``, default 0.4-1.6 s); the SDK re-sends held keys every 90 ms as the protocol asks;
* input -> frame latency of one input = time from sending it to receiving the first ``frame`` message
  whose ``input_seq`` >= its seq (the server sends that message just before the frame); "shown" is the
  same up to the decoded video frame that carries it (what a viewer sees, after encode/RTP/decode);
* fps = decoded frames received per session per second over the window;
* from ``/metrics`` (differences over the window): engine steps, their mean wall time, the batch sizes,
  late chunks, dropped frames, and the server's own input latency (arrival -> frame handed to encoder).

Prints a table, or with ``--json`` one JSON object ``{"config": ..., "results": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from stream_server.sdk import Session, StreamClient

KEY_SETS = (("w",), ("s",), ("a",), ("d",), ("w", "a"), ("w", "d"), ("j",), ("l",), ("i",), ("k",), ())
DRAIN_SECONDS = 4.0  # after the window, inputs sent near its end still get this long to show up


# -- the server -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_model(model: str, max_sessions: int, log_path: Path, chunk_frames: int = 3):
    """``sana-wm-stream serve --model MODEL`` on a free port; yields its base URL."""
    port = free_port()
    script = Path(sys.executable).with_name("sana-wm-stream")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "stream_server.cli"]
    data_dir = tempfile.mkdtemp(prefix="latency-bench-")
    command += ["serve", "--model", model, "--port", str(port), "--max-sessions", str(max_sessions),
                "--data-dir", data_dir, "--grace-period", "5", "--chunk-frames", str(chunk_frames)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve exited with {process.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"serve did not answer /healthz in 180 s; see {log_path}")
                time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- /metrics -----------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


async def scrape(client: StreamClient) -> dict[str, float]:
    async with client.http.get(client.url("/metrics")) as response:
        return parse_metrics(await response.text())


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def batch_counts(delta: dict[str, float]) -> dict[int, int]:
    """Steps per batch size, from the cumulative buckets of ``sana_engine_batch_size``."""
    buckets = sorted((float(m.group(1)), v) for k, v in delta.items()
                     if (m := re.fullmatch(r'sana_engine_batch_size_bucket\{le="([^"]+)"\}', k)) and m.group(1) != "+Inf")
    counts, below = {}, 0.0
    for le, cumulative in buckets:
        if cumulative - below > 0:
            counts[int(le)] = int(round(cumulative - below))
        below = cumulative
    return counts


# -- one session --------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """What one client session sees: frame messages, decoded frames, the inputs it sent."""

    session: Session
    messages: list[tuple[float, int]] = field(default_factory=list)  # (arrival, input_seq) of `frame` messages
    frames: list[tuple[float, int | None]] = field(default_factory=list)  # (arrival, input_seq) of decoded frames
    inputs: list[tuple[float, int]] = field(default_factory=list)  # (sent, seq)
    first_frame: asyncio.Event = field(default_factory=asyncio.Event)

    def hook_messages(self) -> None:
        """Timestamp ``frame`` messages on arrival (the SDK only hands them out matched to decoded
        frames). Must run before ``connect()``, which registers ``_on_message`` on the data channel."""
        original = self.session._on_message

        def on_message(text: str) -> None:
            if '"frame"' in text:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(text)
                    if event.get("type") == "frame":
                        self.messages.append((time.monotonic(), int(event["input_seq"])))
            original(text)

        self.session._on_message = on_message

    async def read_frames(self) -> None:
        async for frame in self.session.frames():
            self.frames.append((time.monotonic(), frame.input_seq))
            self.first_frame.set()

    async def send_inputs(self, until: float, gap: tuple[float, float], rng: random.Random) -> None:
        keys: tuple[str, ...] = ()
        while True:
            await asyncio.sleep(rng.uniform(*gap))
            if time.monotonic() >= until:
                return
            keys = rng.choice([k for k in KEY_SETS if k != keys])
            sent = time.monotonic()
            seq = await self.session.send_input(keys=keys)
            self.inputs.append((sent, seq))

    def latencies(self, samples: list[tuple[float, int | None]]) -> list[float | None]:
        """Per input: seconds until the first sample (after sending) whose input_seq >= its seq."""
        out: list[float | None] = []
        for sent, seq in self.inputs:
            hit = next((t for t, s in samples if t >= sent and s is not None and s >= seq), None)
            out.append(None if hit is None else hit - sent)
        return out

    def fps(self, start: float, end: float) -> float:
        return sum(start <= t < end for t, _ in self.frames) / (end - start)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))]


# -- one session count --------------------------------------------------------------------------------------
async def measure(client: StreamClient, n: int, seconds: float, gap: tuple[float, float], seed: int) -> dict:
    rng = random.Random(seed * 1000 + n)
    before = await scrape(client)
    probes = []
    for i in range(n):
        session = await client.create_session(prompt=f"benchmark world {i}", seed=i)
        probe = Probe(session)
        probe.hook_messages()
        probes.append(probe)
    await asyncio.gather(*(p.session.connect(timeout=60) for p in probes))
    readers = [asyncio.ensure_future(p.read_frames()) for p in probes]
    try:
        await asyncio.wait_for(asyncio.gather(*(p.first_frame.wait() for p in probes)), 120)
        start = time.monotonic()
        end = start + seconds
        senders = [asyncio.ensure_future(p.send_inputs(end, gap, rng)) for p in probes]
        await asyncio.sleep(seconds)
        metrics_at_end = await scrape(client)
        await asyncio.gather(*senders)
        await asyncio.sleep(DRAIN_SECONDS)
        stats = [e for p in probes for e in p.session.events if e.get("type") == "stats"]
    finally:
        for reader in readers:
            reader.cancel()
        for probe in probes:
            with contextlib.suppress(Exception):
                await probe.session.end()

    msg = [x for p in probes for x in p.latencies(p.messages)]
    shown = [x for p in probes for x in p.latencies(p.frames)]
    fps = [p.fps(start, end) for p in probes]
    d = metric_delta(before, metrics_at_end)
    steps = d.get("sana_engine_step_seconds_count", 0.0)
    server_lat_n = d.get("sana_input_to_frame_seconds_count", 0.0)
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "sessions": n,
        "seconds": seconds,
        "inputs": len(msg),
        "inputs_unanswered": sum(x is None for x in msg),
        "input_to_frame_ms_p50": ms(percentile([x for x in msg if x is not None], 0.5)),
        "input_to_frame_ms_p95": ms(percentile([x for x in msg if x is not None], 0.95)),
        "input_to_frame_ms_mean": ms(statistics.fmean([x for x in msg if x is not None])) if any(x is not None for x in msg) else None,
        "input_to_shown_ms_p50": ms(percentile([x for x in shown if x is not None], 0.5)),
        "input_to_shown_ms_p95": ms(percentile([x for x in shown if x is not None], 0.95)),
        "fps_per_session": [round(f, 2) for f in fps],
        "fps_min": round(min(fps), 2),
        "fps_mean": round(statistics.fmean(fps), 2),
        "steps": int(steps),
        "step_ms_mean": ms(d["sana_engine_step_seconds_sum"] / steps) if steps else None,
        "engine_busy": round(d.get("sana_engine_step_seconds_sum", 0.0) / seconds, 3),
        "batch_sizes": batch_counts(d),
        "batch_mean": round(d["sana_engine_batch_size_sum"] / steps, 2) if steps else None,
        "late_chunks": int(d.get("sana_late_chunks_total", 0.0)),
        "dropped_frames": int(d.get("sana_dropped_frames_total", 0.0)),
        "server_input_to_frame_ms_mean": ms(d["sana_input_to_frame_seconds_sum"] / server_lat_n) if server_lat_n else None,
        "overloaded_reported": any(e.get("overloaded") for e in stats),
    }


async def wait_idle(client: StreamClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.info())["active_sessions"] and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


async def run(url: str, counts: list[int], seconds: float, gap: tuple[float, float], seed: int, quiet: bool) -> tuple[dict, list[dict]]:
    async with StreamClient(url, timeout=120) as client:
        info = await client.info()
        # Warm-up (not measured): the first engine step builds caches and is several times slower.
        warm = await client.create_session(prompt="warm-up", seed=0)
        await warm.connect(timeout=60)
        async for frame in warm.frames():
            if frame.index is not None and frame.index >= info["chunk_frames"]:
                break
        await warm.end()
        await wait_idle(client)
        results = []
        for n in counts:
            if not quiet:
                print(f"... {n} session(s), {seconds:g} s", file=sys.stderr, flush=True)
            results.append(await measure(client, n, seconds, gap, seed))
            await wait_idle(client)
        return info, results


def table(info: dict, results: list[dict]) -> str:
    chunk_s = info["chunk_frames"] / info["fps"]
    lines = [
        f"model {info['model']} {info['width']}x{info['height']} @ {info['fps']} fps, chunk {info['chunk_frames']} frames "
        f"({chunk_s:g} s)",
        "| sessions | inputs | input→frame p50 / p95 (ms) | input→shown p50 / p95 (ms) | fps per session | "
        "steps | step mean (ms) | batch sizes (steps) | engine busy | late chunks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fps = ", ".join(f"{f:.1f}" for f in r["fps_per_session"])
        batches = ", ".join(f"{b}: {c}" for b, c in sorted(r["batch_sizes"].items()))
        unanswered = f" ({r['inputs_unanswered']} unanswered)" if r["inputs_unanswered"] else ""
        lines.append(
            f"| {r['sessions']} | {r['inputs']}{unanswered} | {r['input_to_frame_ms_p50']:.0f} / {r['input_to_frame_ms_p95']:.0f} | "
            f"{r['input_to_shown_ms_p50']:.0f} / {r['input_to_shown_ms_p95']:.0f} | {fps} | {r['steps']} | "
            f"{r['step_ms_mean']:.0f} | {batches} | {100 * r['engine_busy']:.0f}% | {r['late_chunks']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,2,4", help="comma-separated session counts (default 1,2,4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per session count (default 20)")
    parser.add_argument("--gap", default="0.4,1.6", help="min,max seconds between a session's inputs (default 0.4,1.6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input timing and keys")
    parser.add_argument("--chunk-frames", type=int, default=3, choices=[1, 2, 3], help="latent frames per chunk of the served model (1: 0.5 s chunks, the low-latency mode)")
    parser.add_argument("--model", default="demo", help="built-in model of the server started here (default demo)")
    parser.add_argument("--url", help="measure this running server instead of starting serve --model MODEL")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        counts = [int(x) for x in args.sessions.split(",") if x.strip()]
        gap = tuple(float(x) for x in args.gap.split(","))
        assert counts and min(counts) >= 1 and len(gap) == 2 and 0 < gap[0] <= gap[1] and args.seconds > 0
    except (ValueError, AssertionError):
        parser.error("--sessions takes positive integers like 1,2,4; --gap two seconds like 0.4,1.6; --seconds > 0")

    if args.url:
        info, results = asyncio.run(run(args.url, counts, args.seconds, gap, args.seed, args.json))
        server = args.url
    else:
        log_path = Path(tempfile.mkstemp(prefix="latency-serve-", suffix=".log")[1])
        with serve_model(args.model, max(counts), log_path, args.chunk_frames) as url:
            info, results = asyncio.run(run(url, counts, args.seconds, gap, args.seed, args.json))
        server = f"subprocess: sana-wm-stream serve --model {args.model}"
    config = {"server": server, "seconds": args.seconds, "gap": gap, "seed": args.seed, "cpu_count": os.cpu_count(), **info}
    if args.json:
        print(json.dumps({"config": config, "results": results}, indent=2))
    else:
        print(table(info, results))


if __name__ == "__main__":
    main()
