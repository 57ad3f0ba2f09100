"""The batched engine on the tiny preset: batching, prompts, re-basing, suspend/resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from world_model.controls import CameraRig
from world_model.engine import build_engine, prepare_image
from world_model.engine_api import ChunkRequest, EngineError

SCRIPTS = (["w"], ["d", "w"], ["i"])


@pytest.fixture(scope="module")
def engine():
    return build_engine("tiny")


class Driver:
    """One session and the camera that steers it, as a server would hold them."""

    def __init__(self, engine, keys, seed=0, prompt="a harbour", image=None):
        self.engine, self.keys, self.rig = engine, keys, CameraRig()
        self.id = engine.open_session(prompt=prompt, image=image, seed=seed)

    def request(self) -> ChunkRequest:
        poses = np.stack([self.rig.step(self.keys) for _ in range(self.engine.info.chunk_pixel_frames)])
        return ChunkRequest(self.id, poses)


def _run(engine, drivers, chunks):
    """Frames of each driver's session over ``chunks`` steps, all drivers batched in each step."""
    out = [[] for _ in drivers]
    for _ in range(chunks):
        for i, result in enumerate(engine.step([d.request() for d in drivers])):
            assert result.session_id == drivers[i].id
            out[i].append(result.frames)
    return [np.concatenate(f) for f in out]


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """uint8 frames of two fp32 runs: equal up to a rounding flip."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_frames_shape_and_counts(engine):
    d = Driver(engine, ["w"])
    info = engine.info
    results = [engine.step([d.request()])[0] for _ in range(2)]
    assert [r.chunk_index for r in results] == [0, 1]
    assert [r.first_frame for r in results] == [0, info.chunk_pixel_frames]
    for r in results:
        assert r.frames.shape == (info.chunk_pixel_frames, info.height, info.width, 3)
        assert r.frames.dtype == np.uint8
    # The clean latents of each chunk (for recordings): the image anchor + 3, then 3.
    assert [r.latents.shape for r in results] == [(16, 4, 4, 8), (16, 3, 4, 8)]
    assert results[0].latents.dtype == np.float16
    engine.close_session(d.id)


def test_a_batch_of_sessions_at_different_points_equals_each_alone(engine):
    """Three sessions with their own prompts, seeds and cameras; one joins late, so a single step holds a
    first chunk, a second chunk and a later chunk (three kinds) at different RoPE positions."""
    prompts = ("a harbour", "a forest path", "a desert road")
    alone = []
    for i, keys in enumerate(SCRIPTS):
        d = Driver(engine, keys, seed=i, prompt=prompts[i])
        alone.append(_run(engine, [d], 4 - i)[0])
        engine.close_session(d.id)

    drivers = [Driver(engine, keys, seed=i, prompt=prompts[i]) for i, keys in enumerate(SCRIPTS)]
    frames = [[] for _ in drivers]
    for step in range(4):
        active = [i for i in range(3) if step >= i]  # session i joins at step i
        for i, result in zip(active, engine.step([drivers[i].request() for i in active])):
            frames[i].append(result.frames)
    for i in range(3):
        _close(np.concatenate(frames[i]), alone[i])
        engine.close_session(drivers[i].id)
    assert not np.array_equal(alone[0][:24], alone[1][:24])  # the sessions really differ


def test_prompt_change_applies_from_the_next_chunk(engine):
    a, b = Driver(engine, ["w"]), Driver(engine, ["w"])
    first = _run(engine, [a, b], 1)
    np.testing.assert_array_equal(first[0], first[1])
    engine.set_prompt(b.id, "a snowy mountain pass at night")
    second = _run(engine, [a, b], 1)
    assert np.abs(second[0].astype(int) - second[1].astype(int)).mean() > 0.5
    for d in (a, b):
        engine.close_session(d.id)


def test_rebasing_rope_time_leaves_the_video_unchanged():
    """A session re-based every few latent frames renders what an unbounded RoPE table would."""
    plain, rebased = build_engine("tiny"), build_engine("tiny", rebase_after=8)
    runs = []
    for eng in (plain, rebased):
        d = Driver(eng, ["w", "d"])
        runs.append(_run(eng, [d], 6)[0])
        eng.settle()
        positions = eng._sessions[d.id].state.next_frame
        runs.append(positions)
    _close(runs[0], runs[2])
    assert runs[1] == 4 + 5 * 3 and runs[3] < 8 + 3  # plain keeps counting, the re-based one stays bounded


def test_state_size_is_flat_in_session_length(engine):
    d = Driver(engine, ["w"])
    sizes = []
    for chunk in range(30):
        engine.step([d.request()])
        if chunk in (2, 29):
            sizes.append(engine.state_bytes(d.id))
    assert sizes[0] == sizes[1] > 0
    engine.close_session(d.id)


def test_export_import_continues_bit_exactly(engine):
    d = Driver(engine, ["w", "j"], seed=5)
    _run(engine, [d], 2)
    data = engine.export_session(d.id)
    rig_state = d.rig.state_dict()
    expected = _run(engine, [d], 2)[0]

    other = build_engine("tiny")
    resumed = Driver.__new__(Driver)
    resumed.engine, resumed.keys, resumed.rig = other, d.keys, CameraRig.from_state_dict(rig_state)
    resumed.id = other.import_session(data)
    np.testing.assert_array_equal(_run(other, [resumed], 2)[0], expected)
    with pytest.raises(EngineError, match="not an exported session"):
        other.import_session(b"garbage")


def test_threads_set_torchs_cpu_threads_and_are_checked():
    import torch

    saved = torch.get_num_threads()
    try:
        build_engine("tiny", threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(EngineError, match="threads must be at least 1"):
            build_engine("tiny", threads=0)
    finally:
        torch.set_num_threads(saved)


def test_images_of_any_shape_are_resized_and_centre_cropped():
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, 150:250] = 255  # a white band in the centre quarter
    out = prepare_image(wide, 256, 128)
    assert out.shape == (128, 256, 3)
    # The 4:1 image scaled to height 128 is 512 wide; the centre 256 columns keep the band at 75..181.
    assert out[:, 100:150].min() > 200 and out[:, :60].max() < 30 and out[:, -60:].max() < 30
    gray = prepare_image(np.full((64, 64), 7, np.uint8), 256, 128)
    assert gray.shape == (128, 256, 3) and int(gray.mean()) == 7


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8, 3), np.uint8), "at least 16 pixels"),
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64, 5), np.uint8), "uint8"),
    ],
)
def test_bad_images_are_refused(engine, image, message):
    with pytest.raises(EngineError, match=message):
        engine.open_session(prompt="x", image=image)


def test_bad_requests_are_refused_and_harm_no_session(engine):
    d = Driver(engine, ["w"])
    good = d.request()
    with pytest.raises(EngineError, match="unknown session"):
        engine.step([ChunkRequest("nope", good.poses)])
    with pytest.raises(EngineError, match="poses must be"):
        engine.step([ChunkRequest(d.id, good.poses[:5])])
    bad = good.poses.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(EngineError, match="poses must be"):
        engine.step([ChunkRequest(d.id, bad)])
    with pytest.raises(EngineError, match="only once"):
        engine.step([good, good])
    with pytest.raises(EngineError, match="seed"):
        engine.open_session(prompt="x", seed=-1)
    with pytest.raises(EngineError, match="prompt"):
        engine.set_prompt(d.id, "x" * 5000)
    (result,) = engine.step([good])  # the session is untouched by all of the above
    assert result.chunk_index == 0
    engine.close_session(d.id)
    engine.close_session(d.id)  # closing twice is harmless


def test_settling_after_the_frames_changes_nothing():
    """The state write runs in settle(), after a step's frames are out; whether the caller settles after each step
    or leaves it to the next step, the frames are the same, and a session closed in between does not disturb the
    write of the others in its batch."""
    runs = []
    for settle_early in (False, True):
        eng = build_engine("tiny")
        a, b = Driver(eng, ["w", "d"], seed=1), Driver(eng, ["a"], seed=2)
        frames = []
        for chunk in range(4):
            frames.append([r.frames for r in eng.step([a.request(), b.request()] if chunk < 2 else [a.request()])])
            assert eng._pending  # the write waits for settle()
            if chunk == 1:
                eng.close_session(b.id)  # leaves between its last step and that step's write
            if settle_early:
                eng.settle()
                assert not eng._pending
        runs.append(frames)
    for early, late in zip(*runs):
        for x, y in zip(early, late):
            assert np.array_equal(x, y)


def test_state_size_and_export_settle_first(engine):
    d = Driver(engine, ["w"], seed=4)
    engine.step([d.request()])
    assert engine.state_bytes(d.id) > engine._get(d.id).vae_cache.nbytes  # the DiT state is there, written
    engine.step([d.request()])
    data = engine.export_session(d.id)
    assert not engine._pending
    restored = engine.import_session(data)
    assert engine.state_bytes(restored) == engine.state_bytes(d.id)
    for sid in (d.id, restored):
        engine.close_session(sid)


def test_warm_up_runs_every_chunk_kind_and_leaves_nothing_behind():
    eng = build_engine("tiny")
    seen = []
    advance = eng._advance
    eng._advance = lambda sessions, poses: (seen.append((len(sessions), sessions[0].kind)), advance(sessions, poses))[1]
    eng.warm_up((1, 2))
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert eng.sessions() == [] and not eng._pending


def test_a_failed_state_write_stops_only_its_sessions():
    eng = build_engine("tiny")
    a, b = Driver(eng, ["w"], seed=1), Driver(eng, ["d"], seed=2)
    eng.step([a.request()])  # a is one chunk ahead: the next step batches the two in separate groups
    eng.settle()
    eng.step([a.request(), b.request()])
    forward = eng.model.stream_chunk

    def failing_first_chunk_write(x, *args, **kwargs):
        if kwargs.get("write_state") and x.shape[2] == 4:  # b's first chunk has 4 latent frames, a's second 3
            raise RuntimeError("device lost")
        return forward(x, *args, **kwargs)

    eng.model.stream_chunk = failing_first_chunk_write
    with pytest.raises(RuntimeError, match="device lost"):
        eng.settle()  # b's first-chunk write fails; a's write still runs
    eng.model.stream_chunk = forward
    with pytest.raises(EngineError, match="lost their state"):
        eng.step([b.request()])
    assert len(eng.step([a.request()])[0].frames) == eng.info.chunk_pixel_frames
