"""One real server for the client tests: ``sana-wm-stream serve --model tiny`` on a free port, as a user runs it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_SECONDS = 120  # building the tiny model and importing torch take a few seconds, more on a busy machine
MAX_SESSIONS = 2  # small, so the server-full path is cheap to reach


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, data_dir: Path) -> list[str]:
    script = Path(sys.executable).with_name("sana-wm-stream")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "stream_server.cli"]
    return command + ["serve", "--model", "tiny", "--port", str(port), "--max-sessions", str(MAX_SESSIONS),
                      "--data-dir", str(data_dir), "--grace-period", "20"]


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> str:
    """Base URL of a running ``serve --model tiny``; stopped at the end of the test session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(serve_command(port, tmp_path_factory.mktemp("data")), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"serve did not answer /healthz within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
