"""Module boundaries of the server, the protocol's strictness, and the ``serve`` command's argument errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from stream_server import protocol
from stream_server.cli import main

SERVER = Path(__file__).resolve().parents[2] / "stream_server"
# The live server's modules (cli, generate and bench drive the engine directly and may reach torch).
SERVER_MODULES = ("api", "app", "config", "images", "loop", "media", "metrics", "protocol", "rtc", "scenes", "scheduler", "sessions")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_server_never_imports_torch_and_policy_modules_no_network_stack():
    for name in SERVER_MODULES:
        path = SERVER / f"{name}.py"
        imports = imported_modules(path)
        assert "torch" not in imports, f"{path.name} imports torch"
        if path.name in ("scheduler.py", "protocol.py", "sessions.py", "config.py"):
            assert not imports & {"aiohttp", "aiortc", "av"}, f"{path.name} imports {imports & {'aiohttp', 'aiortc', 'av'}}"


def test_the_server_and_the_sdk_load_without_torch():
    """The tensors stay on the engine's side: importing the app, every live-server module and the SDK
    (in a fresh interpreter) must not pull torch in."""
    modules = ", ".join(f"stream_server.{name}" for name in (*SERVER_MODULES, "sdk", "jobs", "recording", "replays"))
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "text, code",
    [
        ("[]", "bad_message"),
        ('{"type": 1}', "bad_message"),
        ('{"type": "input", "seq": true, "keys": []}', "bad_message"),
        ('{"type": "input", "seq": -1, "keys": []}', "bad_message"),
        ('{"type": "input", "seq": 1, "keys": "w"}', "bad_message"),
        ('{"type": "input", "seq": 1, "keys": [], "mouse": {"dx": 1}}', "bad_message"),
        ('{"type": "input", "seq": 1, "keys": [], "mouse": {"dx": "1", "dy": 0}}', "bad_message"),
        ('{"type": "input", "seq": 1, "keys": [], "mouse": {"dx": 1e9, "dy": 0}}', "bad_message"),
        ('{"type": "input", "seq": 1, "keys": [], "extra": 0}', "bad_message"),
        ('{"type": "prompt", "text": "  "}', "bad_message"),
        ('{"type": "ping"}', "bad_message"),
        ('{"type": "ping", "t": NaN}', "bad_message"),
        ("x" * (protocol.MAX_MESSAGE_CHARS + 1), "message_too_long"),
    ],
)
def test_protocol_refuses(text, code):
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_client_message(text)
    assert info.value.code == code


def test_protocol_accepts():
    message = protocol.parse_client_message('{"type": "input", "seq": 3, "keys": ["w", "d"], "mouse": {"dx": -1.5, "dy": 2}}')
    assert message == protocol.InputMessage(seq=3, keys=frozenset("wd"), mouse_dx=-1.5, mouse_dy=2.0)
    assert protocol.parse_client_message('{"type": "input", "seq": 4, "keys": []}').mouse_dx == 0.0
    assert protocol.parse_client_message('{"type": "ping", "t": 5}') == protocol.PingMessage(5.0)


@pytest.mark.parametrize("args", [["--max-sessions", "0"], ["--port", "0"], ["--idle-timeout", "-1"], ["--grace-period", "0"],
                                  ["--threads", "0"]])
def test_serve_refuses_bad_arguments_in_one_line(args, capsys):
    assert main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err


def test_serve_leaves_one_core_to_encoding_and_the_network(monkeypatch):
    from stream_server.cli import serve_threads

    for cores, threads in ((1, 1), (2, 1), (8, 7)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert serve_threads("cpu") == threads
    assert serve_threads("cuda") is None and serve_threads("cuda:1") is None


def test_serve_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--frobnicate"])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_serve_starts_no_refine_worker_for_models_without_a_refiner():
    """(Their replays are preview-only: tests/replays/test_preview_only.py.)"""
    from stream_server.cli import build_parser, serve_no_refiner, start_refine_worker

    for argv in (["serve"], ["serve", "--model", "demo", "--random-weights"], ["serve", "--model", "tiny", "--checkpoint", "/nowhere"]):
        args = build_parser().parse_args(argv)
        assert serve_no_refiner(args) is not None and start_refine_worker(args) is None


def test_refine_of_a_model_without_a_refiner_is_one_line(tmp_path, capsys):
    assert main(["refine", "--data-dir", str(tmp_path), "--model", "demo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo" in err and "Traceback" not in err
