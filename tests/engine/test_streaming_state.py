"""The cached chunk-by-chunk streaming path: NVlabs golden run, streaming == one-shot, bounded state, resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import GOLDEN, rel_err
from world_model import load_transformer, preset
from world_model.camera import camera_inputs
from world_model.sampler import SamplerConfig, chunk_spans, sample_chunk
from world_model.state import SessionState
from world_model.transformer import Layout, SanaWMTransformer

GOLDEN_TOL = 1e-3  # the bound; velocities land <= 3.3e-5, states far below
EQUIV_TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    model = load_transformer(GOLDEN / "model.safetensors")
    return model, load_file(str(GOLDEN / "inputs.safetensors")), load_file(str(GOLDEN / "stream.safetensors"))


def _nvlabs_slots(state: SessionState, batch: int) -> dict[str, torch.Tensor]:
    """Our state in the NVlabs cache layout (block b, slot s) for comparison."""
    out = {}
    for b, carry in enumerate(state.carries):
        mixer = carry.mixer
        if hasattr(mixer, "main"):
            out[f"b{b}.s0"] = mixer.main.transpose(-1, -2)  # NVlabs stores [V, K]
            out[f"b{b}.s1"] = mixer.norm
            out[f"b{b}.s2"] = mixer.camera  # [K, V] in both
            tail = mixer.k_tail  # (B, 3, S, C) -> (B*S, 3, C)
            out[f"b{b}.s4"] = tail.permute(0, 2, 1, 3).reshape(-1, tail.shape[1], tail.shape[3])
        else:
            last = mixer.prev if mixer.prev is not None else mixer.sink  # the chunk just written
            for slot, t in enumerate((last.k, last.v, last.k_cam, last.v_cam)):
                out[f"b{b}.s{slot}"] = t
        out[f"b{b}.s9"] = carry.ffn_tail.permute(0, 3, 1, 2)  # (B, C, 1, S)
    return out


def test_reproduces_the_nvlabs_streaming_run(golden):
    model, inputs, stream = golden
    text, mask = inputs["cond"][:, 0], inputs["cond_mask"].bool()
    c2w, intr = inputs["c2w"][None], inputs["intrinsics_crop"][None]
    state = model.new_state(1)
    noise = inputs["z0"]
    calls = []
    finals = []
    for c, (start, end) in enumerate(chunk_spans(10, SamplerConfig())):

        def denoise(x, t, write, start=start):
            v = model(x, t, text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=write)
            calls.append((x.clone(), v))
            return v

        with torch.no_grad():
            finals.append(sample_chunk(denoise, noise[:, :, start:end], SamplerConfig(), noise[:, :, 0] if c == 0 else None))
        ours = _nvlabs_slots(state, 1)
        for key, theirs in ((k.split("cache.")[1], v) for k, v in stream.items() if k.startswith(f"chunk{c}.cache.")):
            if key.endswith("s6"):
                continue  # NVlabs' block-type flag
            if key.startswith("b3.") and not key.endswith("s9"):
                # Softmax K/V are cached in the SDPA dtype, bf16, as NVlabs does: fp32 noise of ~1e-6 can
                # flip a rounding, so allow one bf16 ulp per element and bound the mean error.
                assert ours[key].dtype == torch.bfloat16, key
                diff = (ours[key].float() - theirs.float()).abs()
                assert bool((diff <= theirs.float().abs() * 2**-7 + 1e-6).all()), (c, key)
                assert float(diff.mean() / theirs.abs().mean()) < GOLDEN_TOL, (c, key)
            else:
                assert rel_err(ours[key].float(), theirs.float()) < GOLDEN_TOL, (c, key)
    assert len(calls) == 15
    for i, (x, v) in enumerate(calls):
        assert rel_err(x, stream[f"call{i:02d}.x"]) < GOLDEN_TOL, i
        assert rel_err(v, stream[f"call{i:02d}.v"]) < GOLDEN_TOL, i
    assert rel_err(torch.cat(finals, dim=2), stream["final"]) < GOLDEN_TOL


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = SanaWMTransformer(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
        for blk in model.blocks:
            if not blk.is_softmax:
                blk.attn.A_log.uniform_(-1, 1)
    return model


def _session_inputs(frames, hw=(2, 3), batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixel = 8 * (frames - 1) + 1
    c2w = torch.eye(4).repeat(batch, pixel, 1, 1)
    c2w[..., 0, 3] = torch.linspace(0, 0.3, pixel)
    c2w[..., 2, 3] = torch.cumsum(torch.rand(batch, pixel, generator=gen) * 0.05, dim=1)
    intr = torch.tensor([70.0, 70.0, 16.0 * hw[1], 16.0 * hw[0]]).repeat(batch, pixel, 1)
    text = torch.randn(batch, 6, 24, generator=gen)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[:, -2:] = False
    return c2w, intr, text, mask


@pytest.mark.parametrize("chunk", [3, 1, 2])
def test_cached_chunks_equal_the_one_shot_streaming_mode(chunk):
    """Earlier chunks given clean at t=0: the last chunk's velocity equals the one-shot oracle.

    Softmax runs in fp32 here: the bf16 cast that mirrors the references rounds the one-shot and the
    cached K/V independently (a ~1e-4 effect that tests nothing about the cache).
    """
    model = _tiny(softmax_bf16=False)
    frames, hw = 10 if chunk == 3 else 4 + 2 * chunk, (2, 3)
    c2w, intr, text, mask = _session_inputs(frames, hw)
    clean = torch.randn(1, 16, frames, *hw)
    spans = chunk_spans(frames, SamplerConfig(chunk_frames=chunk))
    last_start, last_end = spans[-1]
    noisy = clean.clone()
    noisy[:, :, last_start:] = torch.randn(1, 16, last_end - last_start, *hw)
    t = torch.zeros(1, frames)
    t[:, last_start:] = 889.0

    layout = Layout("streaming", *hw, chunks=tuple(spans))
    cam = camera_inputs(c2w, intr, frames, hw)
    with torch.no_grad():
        oneshot, _ = model.run(noisy, t, text, mask, cam, layout)
        state = model.new_state(1)
        for start, end in spans[:-1]:
            model(clean[:, :, start:end], torch.zeros(1, end - start), text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=True)
        cached = model(noisy[:, :, last_start:], t[:, last_start:], text, mask, c2w, intr, mode="streaming", state=state, start_frame=last_start)
    assert rel_err(cached, oneshot[:, :, last_start:]) < EQUIV_TOL


def test_denoising_calls_leave_the_state_untouched():
    model = _tiny()
    c2w, intr, text, mask = _session_inputs(7)
    state = model.new_state(1)
    with torch.no_grad():
        model(torch.randn(1, 16, 4, 2, 3), torch.zeros(1, 4), text, mask, c2w, intr, mode="streaming", state=state, start_frame=0, write_state=True)
        before = {k: v.clone() for k, v in state.tensors().items()}
        model(torch.randn(1, 16, 3, 2, 3), torch.full((1, 3), 960.0), text, mask, c2w, intr, mode="streaming", state=state, start_frame=4)
    after = state.tensors()
    assert before.keys() == after.keys() and state.next_frame == 4
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="continues at latent frame 4"):
        model(torch.randn(1, 16, 3, 2, 3), torch.zeros(1, 3), text, mask, c2w, intr, mode="streaming", state=state, start_frame=7)


def _run_chunks(model, state, chunks, start_chunk, text, mask, c2w, intr, seed):
    gen = torch.Generator().manual_seed(seed)
    outs = []
    spans = chunk_spans(4 + 3 * (start_chunk + chunks), SamplerConfig())[start_chunk : start_chunk + chunks]
    for start, end in spans:
        noise = torch.randn(1, 16, end - start, 2, 3, generator=gen)

        def denoise(x, t, write, start=start):
            return model(x, t, text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=write)

        with torch.no_grad():
            outs.append(sample_chunk(denoise, noise, SamplerConfig(timesteps=(1000, 727)), noise[:, :, 0] if start == 0 else None))
    return torch.cat(outs, dim=2)


def test_state_size_is_constant_in_session_length():
    model = _tiny()
    c2w, intr, text, mask = _session_inputs(4 + 3 * 30)
    state = model.new_state(1)
    _run_chunks(model, state, 3, 0, text, mask, c2w, intr, seed=1)
    size3 = state.nbytes
    _run_chunks(model, state, 27, 3, text, mask, c2w, intr, seed=2)
    assert state.next_frame == 4 + 3 * 29
    assert state.nbytes == size3 > 0


def test_serialise_restore_continue_is_bit_exact(tmp_path):
    model = _tiny()
    c2w, intr, text, mask = _session_inputs(4 + 3 * 5)
    state = model.new_state(1)
    _run_chunks(model, state, 2, 0, text, mask, c2w, intr, seed=3)
    state.save(tmp_path / "session.state")
    restored = SessionState.load(tmp_path / "session.state")
    assert restored.next_frame == state.next_frame and restored.nbytes == state.nbytes
    a = _run_chunks(model, state, 3, 2, text, mask, c2w, intr, seed=4)
    b = _run_chunks(model, restored, 3, 2, text, mask, c2w, intr, seed=4)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(state.tensors().values(), restored.tensors().values()))


def test_state_layout_predicts_the_real_state():
    model = _tiny()
    c2w, intr, text, mask = _session_inputs(10)
    state = model.new_state(1)
    _run_chunks(model, state, 3, 0, text, mask, c2w, intr, seed=5)
    from world_model.state import layout_nbytes, state_layout

    expected = state_layout(model.config, (2, 3), torch.float32)
    actual = {k: (tuple(v.shape), v.dtype) for k, v in state.tensors().items()}
    assert actual == expected
    assert layout_nbytes(expected) == state.nbytes


def test_a_batch_of_three_sessions_equals_each_alone():
    """Three sessions with their own history, prompt and camera in one forward equal the three run alone.

    With an fp32 softmax window: a bf16 one turns the batched GEMMs' last-bit differences into an occasional
    one-ulp bf16 flip of a cached key (2e-4 in the velocity, measured), which says nothing about batching."""
    model = _tiny(softmax_bf16=False)
    sessions = []
    for seed in range(3):
        c2w, intr, text, mask = _session_inputs(4 + 3 * 3, seed=seed + 10)
        state = model.new_state(1)
        _run_chunks(model, state, 2, 0, text, mask, c2w, intr, seed=seed)
        sessions.append((state, c2w, intr, text, mask))
    start = sessions[0][0].next_frame
    noise = torch.randn(3, 16, 3, 2, 3)
    t = torch.full((3, 3), 889.0)
    clones = _clone_sessions(sessions)
    with torch.no_grad():
        alone = [
            model(noise[i : i + 1], t[i : i + 1], text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=True)
            for i, (state, c2w, intr, text, mask) in enumerate(clones)
        ]
        batched = SessionState.stack([s[0] for s in sessions])
        cat = lambda j: torch.cat([s[j] for s in sessions])
        together = model(noise, t, cat(3), cat(4), cat(1), cat(2), mode="streaming", state=batched, start_frame=start, write_state=True)
    assert rel_err(together, torch.cat(alone)) < EQUIV_TOL
    for one, (state, *_rest) in zip(batched.split(), clones):
        ours, theirs = one.tensors(), state.tensors()
        assert ours.keys() == theirs.keys()
        for k in ours:  # fp32 states tight; bf16 softmax K/V may differ by a rounding
            tol = 1e-2 if ours[k].dtype == torch.bfloat16 else EQUIV_TOL
            assert rel_err(ours[k].float(), theirs[k].float()) < tol, k


def _clone_sessions(sessions):
    return [(SessionState.from_tensors({k: v.clone() for k, v in s.tensors().items()}, s.kinds(), s.next_frame), *rest) for s, *rest in sessions]


def test_sessions_at_different_chunk_kinds_do_not_stack():
    model = _tiny()
    c2w, intr, text, mask = _session_inputs(10)
    a, b = model.new_state(1), model.new_state(1)
    _run_chunks(model, a, 2, 0, text, mask, c2w, intr, seed=1)
    _run_chunks(model, b, 1, 0, text, mask, c2w, intr, seed=1)
    with pytest.raises(ValueError, match="different state slots"):
        SessionState.stack([a, b])


@pytest.mark.parametrize("softmax_bf16", [False, True])
def test_rebasing_rope_time_keeps_the_velocity(softmax_bf16):
    """Turning every cached key back by ``delta`` frames while the next chunk moves back by ``delta`` is a
    change of basis: the next chunk's velocity is unchanged (fp32 softmax: rounding only; bf16-cached
    window: one re-rounding of the cached K)."""
    model = _tiny(softmax_bf16=softmax_bf16)
    frames, hw = 13, (2, 3)
    c2w, intr, text, mask = _session_inputs(frames, hw)
    clean = torch.randn(1, 16, frames, *hw)
    spans = chunk_spans(frames, SamplerConfig())
    state = model.new_state(1)
    with torch.no_grad():
        for start, end in spans[:-1]:
            model(clean[:, :, start:end], torch.zeros(1, end - start), text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=True)
        start, end = spans[-1]
        cam = camera_inputs(c2w, intr, end, hw).frames(start, end)
        t = torch.full((1, end - start), 889.0)
        before = model.stream_chunk(clean[:, :, start:end], t, text, mask, cam, state)
        model.rebase_state(state, 9)
        assert state.next_frame == start - 9
        after = model.stream_chunk(clean[:, :, start:end], t, text, mask, cam, state)
    assert rel_err(after, before) < (1e-3 if softmax_bf16 else 1e-5)


def test_sessions_at_different_positions_batch_like_alone():
    """Two sessions at different latent frames share one forward, each at its own RoPE positions."""
    model = _tiny(softmax_bf16=False)
    hw = (2, 3)
    c2w, intr, text, mask = _session_inputs(13, hw)
    clean = torch.randn(1, 16, 13, *hw)
    spans = chunk_spans(13, SamplerConfig())
    states = []
    with torch.no_grad():
        for upto in (2, 3):  # session A has written 2 chunks, session B 3
            state = model.new_state(1)
            for start, end in spans[:upto]:
                model(clean[:, :, start:end], torch.zeros(1, end - start), text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=True)
            states.append(state)
        x = torch.randn(2, 16, 3, *hw)
        t = torch.full((2, 3), 960.0)
        cams = [camera_inputs(c2w, intr, s.next_frame + 3, hw).frames(s.next_frame, s.next_frame + 3) for s in states]
        alone = [model.stream_chunk(x[i : i + 1], t[:1], text, mask, cams[i], s) for i, s in enumerate(states)]
        batched_state = SessionState.stack(states)
        assert batched_state.next_frame == (7, 10)
        cam = type(cams[0])(torch.cat([c.raymap for c in cams]), torch.cat([c.plucker for c in cams]))
        batched = model.stream_chunk(x, t, text.expand(2, -1, -1), mask.expand(2, -1), cam, batched_state, write_state=True)
    for i in range(2):
        assert rel_err(batched[i : i + 1], alone[i]) < 1e-5
    assert [s.next_frame for s in batched_state.split()] == [10, 13]
