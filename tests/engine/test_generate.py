"""``sana-wm-stream generate`` and ``bench``: real MP4s (the tiny preset; one short clip of the default demo
model), one-line errors, the model flags."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from stream_server.bench import BatchTiming, scheduled_latency
from stream_server.cli import build_parser, main


def _frames(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate


def test_generate_writes_an_h264_clip_of_the_asked_length(tmp_path, capsys):
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 300, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "clip.mp4"
    rc = main(["generate", "--model", "tiny", "--image", str(image), "--prompt", "a harbour", "--actions", "w-8,d-4", "--seconds", "2", "-o", str(out), "-q"])
    assert rc == 0
    frames, rate = _frames(out)
    assert len(frames) == 32 and rate == 16  # 2 s at 16 fps: the second chunk is cut to length
    assert frames[0].shape == (128, 256, 3)
    assert "32 frames" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--actions", "w-8,q-2"], "unknown keys"),
        (["--actions", "w-x"], "action"),
        (["--seconds", "0"], "--seconds"),
        (["--seconds", "nan"], "--seconds"),
        (["--image", "/nonexistent.png"], "cannot read image"),
        (["--checkpoint", "/"], "no Stage-1 DiT"),
        (["--model", "huge"], "unknown model"),
        (["--seed", "-3"], "seed"),
        (["--scene", "moon"], "unknown scene 'moon'"),
        (["-o", "/nonexistent/dir/x.mp4"], "does not exist"),
    ],
)
def test_generate_bad_input_is_one_line(tmp_path, capsys, args, message):
    base = {"--model": "tiny", "--prompt": "x", "--actions": "w-8", "--seconds": "1", "-o": str(tmp_path / "x.mp4")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["generate", "-q"] + [item for pair in base.items() for item in pair]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_bench_prints_the_interface_json(capsys):
    assert main(["bench", "--model", "tiny", "--sessions", "2", "--seconds", "1.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("model", "device", "dtype", "sessions", "chunk_ms_p50", "chunk_ms_p95", "realtime_factor", "max_realtime_sessions", "state_bytes_per_session", "peak_memory_bytes"):
        assert key in result
    assert result["sessions"] == 2 and [b["sessions"] for b in result["batches"]] == [1, 2]
    assert result["chunk_ms_p50"] > 0 and result["state_bytes_per_session"] > 0
    for b in result["batches"]:  # the step up to its frames and the settle phase after them make up the chunk
        assert b["frames_ms_p50"] > 0 and b["settle_ms_p50"] > 0
        assert b["frames_ms_p50"] + b["settle_ms_p50"] == pytest.approx(b["chunk_ms_p50"], rel=0.5)
    assert result["latency_sessions"] == result["max_realtime_sessions"] == 2  # tiny: far faster than real time
    assert 0 < result["input_to_frame_ms_p50"] <= result["input_to_frame_ms_p95"]


def test_scheduled_latency_is_half_a_chunk_plus_the_lead():
    """One session with steps of 0.3 s up to the frames: an input waits on average half a chunk for the next step
    start, then the step and the scheduler's margin; the settle phase after the frames does not count."""
    timings = [BatchTiming(1, 400.0, 400.0, 3.75, frames_ms_p50=300.0, settle_ms_p50=100.0)]
    p50, p95 = scheduled_latency(timings, 1, 1.5)
    assert p50 == pytest.approx(0.75 + 0.3 + 0.08, abs=0.05)
    assert p95 == pytest.approx(0.95 * 1.5 + 0.3 + 0.08, abs=0.05)


def test_the_demo_model_is_the_default_and_random_weights_a_flag():
    parser = build_parser()
    for command in (["serve"], ["bench"], ["generate", "--prompt", "x", "--actions", "w-8", "--seconds", "1", "-o", "x.mp4"]):
        args = parser.parse_args(command)
        assert (args.model, args.random_weights) == ("demo", False)
        assert parser.parse_args([*command, "--random-weights"]).random_weights is True
    assert parser.parse_args(["refine"]).model == "tiny"  # the refiner has random-weight presets only (tiny)


def test_random_weights_with_a_checkpoint_is_one_line(tmp_path, capsys):
    argv = ["generate", "-q", "--prompt", "x", "--actions", "w-8", "--seconds", "1", "-o", str(tmp_path / "x.mp4"), "--checkpoint", "/", "--random-weights"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "exclude each other" in err and "\n" not in err and "Traceback" not in err


def test_generate_runs_the_shipped_demo_model_by_default(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["generate", "--prompt", "a walk", "--actions", "w-8", "--seconds", "0.5", "--chunk-frames", "1", "-o", str(out), "-q"]) == 0
    frames, _ = _frames(out)
    assert len(frames) == 8 and frames[0].shape == (160, 256, 3)
    assert "256x160" in capsys.readouterr().out


def test_generate_starts_from_a_named_scene(tmp_path):
    """--scene starts from that renderer scene: its first frame is near the scene, not the default one."""
    from world_model.start_scenes import find_scene, render_scene

    frames = {}
    for scene in ("pillar", "spheres"):
        out = tmp_path / f"{scene}.mp4"
        argv = ["generate", "-q", "--prompt", "a walk", "--actions", "none-8", "--seconds", "0.5", "--chunk-frames", "1", "--scene", scene, "-o", str(out)]
        assert main(argv) == 0
        frames[scene] = _frames(out)[0][0].astype(float)
    pillar = render_scene(find_scene("pillar"), 256, 160).astype(float)
    assert abs(frames["pillar"] - pillar).mean() < abs(frames["spheres"] - pillar).mean()
