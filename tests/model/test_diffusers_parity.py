"""Parity of ``SanaWMTransformer`` (bidirectional, ``camera_math="diffusers"``) with diffusers 0.42.1.

Both models are built small, every tensor of the diffusers state dict is randomised (the zero-initialised Plücker
embedder and K short convs included) and loaded into ours with ``strict=True``. Inputs are built the way
``SanaWMPipeline`` builds them: an action-string trajectory (times a random first pose, so that re-expressing the
poses relative to frame 0 matters) and per-frame intrinsics go through ``cam_utils.prepare_camera`` for diffusers,
while our model gets the raw ``c2w`` / intrinsics and runs its own camera builder.

About bf16. Both implementations cast the softmax blocks' Q/K/V to bf16 before SDPA, even in an fp32 run. The
fp32 code before that cast is not bit-identical between the two (e.g. the GDN state is kept as [K, V] here and
[V, K] in diffusers), so differences of ~1e-7 reach the cast and occasionally flip a bf16 rounding, which then shows
up as ~1e-4 .. 1e-3 relative error at the output. Hence:

* the 1e-4 parity tests run with that cast neutralised on *both* sides (``Tensor.bfloat16`` patched to the identity),
  which checks every piece of math at fp32 precision;
* ``test_parity_with_bf16_softmax`` runs both as shipped and only asks for bf16-level agreement;
* ``test_mixers_match_given_identical_inputs`` feeds each of our attention mixers the exact input diffusers' mixer
  got, with the bf16 cast live: there the cast sees identical bits and the outputs agree to fp32 round-off -- except
  softmax mixers whose head dim needs no padding (32/64/128/256), where diffusers passes SDPA non-contiguous camera
  Q/K/V and CPU bf16 SDPA then rounds differently from the same values laid out contiguously (see that test).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", minversion="0.42.1")
from diffusers import SanaWMTransformer3DModel  # noqa: E402
from diffusers.pipelines.sana_wm import cam_utils  # noqa: E402

from world_model import transformer as wm_transformer  # noqa: E402
from world_model.camera import camera_inputs, pixel_frames_for  # noqa: E402
from world_model.config import TransformerConfig  # noqa: E402
from world_model.ops.attention import FLASH_HEAD_DIMS  # noqa: E402
from world_model.transformer import SanaWMTransformer  # noqa: E402

PARITY_RTOL = 1e-4  # max |ours - diffusers| <= PARITY_RTOL * max |diffusers| (fp32, bf16 cast neutralised)
CAMERA_ATOL = 1e-5  # our raymap / Plücker tensors against prepare_camera's
MIXER_RTOL = 1e-5  # one attention mixer, identical input, bf16 cast live
BF16_RTOL = 5e-3  # bf16 casts live on both sides, inputs not bit-identical: a bf16 ulp is 2^-8 ~ 4e-3 relative
BF16_VISIBLE = 1e-5  # the bf16 cast moves the output by far more than fp32 round-off (~1e-7)
SWITCH_FACTOR = 10.0  # camera_math="nvlabs" must miss diffusers by more than this many tolerances

VAE_STRIDE = (8, 32, 32)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (used as a cache key)
class Case:
    name: str
    model: dict  # TransformerConfig / SanaWMTransformer3DModel keywords (the names coincide)
    frames: int  # latent T
    height: int  # latent H
    width: int  # latent W
    actions: tuple[str, ...]  # one WASD/IJKL action string per batch element, 8 (T - 1) steps each
    text_len: int = 7
    seed: int = 0

    @property
    def batch(self) -> int:
        return len(self.actions)


CASES = [
    # The "tiny" preset: GDN, GDN, GDN, softmax; head dim 48 (softmax camera branch padded to 128).
    Case(
        name="tiny-4L-h96",
        model=dict(
            num_layers=4,
            hidden_size=96,
            num_attention_heads=2,
            linear_head_dim=48,
            in_channels=16,
            caption_channels=24,
            mlp_ratio=2.0,
            chunk_plucker_post_attn_blocks=4,
            softmax_every_n=4,
        ),
        frames=5,
        height=2,
        width=3,
        actions=("w-8,wl-8,dk-8,si-8", "l-12,aj-10,wi-10"),
        seed=0,
    ),
    # GDN, softmax, GDN, softmax, GDN; head dim 32 (no padding, 1/sqrt(32)); Plücker only in blocks 0-2.
    Case(
        name="5L-h64-sm2",
        model=dict(
            num_layers=5,
            hidden_size=64,
            num_attention_heads=4,
            linear_head_dim=32,
            in_channels=8,
            caption_channels=20,
            mlp_ratio=1.5,
            chunk_plucker_post_attn_blocks=3,
            softmax_every_n=2,
        ),
        frames=7,
        height=3,
        width=4,
        actions=("w-12,wl-12,dk-12,si-12", "l-16,ajk-16,di-16"),
        seed=1,
    ),
]
IDS = [c.name for c in CASES]


# -----------------------------------------------------------------------------------------------------------------
# Building models and inputs
# -----------------------------------------------------------------------------------------------------------------


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every tensor of ``model``'s state dict with seeded random values of a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    new = {}
    for key, value in model.state_dict().items():
        if key.endswith("A_log"):
            t = torch.empty(value.shape).uniform_(-0.7, 0.7, generator=g)  # exp(A_log) in (0.5, 2)
        elif key.endswith("dt_bias"):
            t = torch.empty(value.shape).uniform_(-2.0, 0.5, generator=g)  # decay ~ 0.3 .. 0.95
        elif "scale_shift_table" in key or value.ndim < 2:
            t = torch.randn(value.shape, generator=g) * 0.2
            if "norm" in key and key.endswith("weight"):
                t = t + 1.0  # RMSNorm gains around 1
        else:  # Linear / Conv weights, incl. the zero-initialised plucker_embedder and conv_k / conv_k_cam
            fan_in = value[0].numel()
            t = torch.randn(value.shape, generator=g) * min(0.2, 1.0 / math.sqrt(fan_in))
        new[key] = t.to(value.dtype)
    model.load_state_dict(new, strict=True)
    for key, value in model.state_dict().items():  # nothing left at its (possibly zero) init
        assert value.abs().max() > 0, key


@functools.lru_cache(maxsize=None)
def _diffusers_model(case: Case) -> SanaWMTransformer3DModel:
    torch.manual_seed(case.seed)
    model = SanaWMTransformer3DModel(patch_size=(1, 1, 1), **case.model).eval()
    randomise_(model, 1000 + case.seed)
    return model


@functools.lru_cache(maxsize=None)
def _our_model(case: Case, camera_math: str) -> SanaWMTransformer:
    torch.manual_seed(case.seed)
    model = SanaWMTransformer(TransformerConfig(camera_math=camera_math, **case.model)).eval()
    model.load_state_dict(_diffusers_model(case).state_dict(), strict=True)
    return model


def _random_rigid(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    m = np.eye(4)
    m[:3, :3] = q
    m[:3, 3] = rng.normal(size=3) * 2.0
    return m


def _trajectory(case: Case, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(c2w (F, 4, 4), intrinsics (F, 4))`` float32 of batch element ``index``, F = 8 (T - 1) + 1."""
    rng = np.random.default_rng(100 * case.seed + index)
    num_pixel = pixel_frames_for(case.frames)
    local = cam_utils.action_string_to_c2w(case.actions[index]).astype(np.float64)
    assert local.shape == (num_pixel, 4, 4), f"action string must have {num_pixel - 1} steps"
    first = _random_rigid(rng)
    assert not np.allclose(first, np.eye(4))
    c2w = (first[None] @ local).astype(np.float32)
    h_px, w_px = VAE_STRIDE[1] * case.height, VAE_STRIDE[2] * case.width
    fx = 0.9 * w_px * (1.0 + 0.05 * np.sin(np.arange(num_pixel) / 5.0 + index))  # a slow zoom
    intr = np.stack(
        [
            fx,
            fx * (1.0 + 0.03 * rng.normal()),
            w_px / 2 + 3.0 * rng.normal(size=num_pixel),
            h_px / 2 + 3.0 * rng.normal(size=num_pixel),
        ],
        axis=-1,
    ).astype(np.float32)
    return c2w, intr


@dataclasses.dataclass
class Inputs:
    latents: torch.Tensor  # (B, C, T, H, W)
    timestep: torch.Tensor  # (B, 1, T), the pipeline's layout
    text: torch.Tensor  # (B, L, caption_channels)
    text_mask: torch.Tensor  # (B, L) bool
    c2w: torch.Tensor  # (B, F, 4, 4)
    intrinsics: torch.Tensor  # (B, F, 4)
    raymap: torch.Tensor  # (B, T, 20) from prepare_camera
    plucker: torch.Tensor  # (B, 48, T, H, W) from prepare_camera


@functools.lru_cache(maxsize=None)
def _inputs(case: Case) -> Inputs:
    torch.manual_seed(case.seed)
    g = torch.Generator().manual_seed(2000 + case.seed)
    poses, intrs, raymaps, pluckers = [], [], [], []
    for b in range(case.batch):
        c2w, intr = _trajectory(case, b)
        cam = cam_utils.prepare_camera(
            c2w,
            intr,
            target_size=(VAE_STRIDE[1] * case.height, VAE_STRIDE[2] * case.width),
            vae_stride=VAE_STRIDE,
        )
        poses.append(torch.from_numpy(c2w))
        intrs.append(torch.from_numpy(intr))
        raymaps.append(cam["raymap"])
        pluckers.append(cam["chunk_plucker"])
    shape = (case.batch, case.model["in_channels"], case.frames, case.height, case.width)
    timestep = torch.rand(case.batch, 1, case.frames, generator=g) * 1000.0  # non-integer: both truncate
    timestep[:, :, 0] = 0.0  # the pipeline pins the conditioning frame to t = 0
    timestep[0, 0, -1] = 1000.0
    mask = torch.ones(case.batch, case.text_len, dtype=torch.bool)
    mask[-1, case.text_len - 3 :] = False  # padding in the last prompt
    return Inputs(
        latents=torch.randn(shape, generator=g),
        timestep=timestep,
        text=torch.randn(case.batch, case.text_len, case.model["caption_channels"], generator=g),
        text_mask=mask,
        c2w=torch.stack(poses),
        intrinsics=torch.stack(intrs),
        raymap=torch.stack(raymaps),
        plucker=torch.stack(pluckers),
    )


@torch.no_grad()
def run_diffusers(case: Case, inputs: Inputs | None = None) -> torch.Tensor:
    x = inputs or _inputs(case)
    return _diffusers_model(case)(
        hidden_states=x.latents,
        timestep=x.timestep,
        encoder_hidden_states=x.text[:, None],  # (B, 1, L, C) as the pipeline passes it
        encoder_attention_mask=x.text_mask.long(),
        camera_conditions=x.raymap,
        chunk_plucker=x.plucker,
        return_dict=False,
    )[0]


@torch.no_grad()
def run_ours(case: Case, camera_math: str = "diffusers", inputs: Inputs | None = None) -> torch.Tensor:
    x = inputs or _inputs(case)
    return _our_model(case, camera_math)(
        x.latents, x.timestep[:, 0], x.text, x.text_mask, x.c2w, x.intrinsics, mode="bidirectional"
    )


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def _no_cast(self, *args, **kwargs):
    return self


@pytest.fixture
def fp32_softmax(monkeypatch):
    """Neutralise the pre-SDPA bf16 cast in both implementations (both call ``Tensor.bfloat16()``)."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", _no_cast)


# -----------------------------------------------------------------------------------------------------------------
# Structure and camera inputs
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_keys_and_shapes_match(case):
    ours, theirs = _our_model(case, "diffusers").state_dict(), _diffusers_model(case).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_camera_builder_matches_prepare_camera(case):
    x = _inputs(case)
    cam = camera_inputs(x.c2w, x.intrinsics, case.frames, (case.height, case.width))
    assert cam.raymap.shape == x.raymap.shape == (case.batch, case.frames, 20)
    assert cam.plucker.shape == x.plucker.shape == (case.batch, 48, case.frames, case.height, case.width)
    torch.testing.assert_close(cam.raymap, x.raymap, atol=CAMERA_ATOL, rtol=0)
    torch.testing.assert_close(cam.plucker, x.plucker, atol=CAMERA_ATOL, rtol=0)
    # The first pose is not the identity, so the relative-pose step is exercised; frame 0 becomes exactly I.
    assert not torch.allclose(x.c2w[:, 0], torch.eye(4).expand(case.batch, 4, 4), atol=0.1)
    assert torch.equal(cam.raymap[:, 0, :16], torch.eye(4).flatten().expand(case.batch, 16))
    # The trajectories move and rotate: later poses differ from frame 0.
    assert (cam.raymap[:, -1, :16] - cam.raymap[:, 0, :16]).abs().amax(-1).min() > 0.05


# -----------------------------------------------------------------------------------------------------------------
# Whole-model parity
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity_fp32(case, fp32_softmax):
    ref = run_diffusers(case)
    ours = run_ours(case)
    assert ours.shape == ref.shape == _inputs(case).latents.shape
    assert torch.isfinite(ref).all()
    err = rel_err(ours, ref)
    print(f"\n[{case.name}] fp32 parity: max|ours - diffusers| / max|diffusers| = {err:.3e}")
    assert err <= PARITY_RTOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_camera_math_switch(case, fp32_softmax):
    """``camera_math="diffusers"`` reproduces diffusers; ``"nvlabs"`` (no RMS rescale after UCPE) clearly does not."""
    ref = run_diffusers(case)
    err_diffusers = rel_err(run_ours(case, "diffusers"), ref)
    err_nvlabs = rel_err(run_ours(case, "nvlabs"), ref)
    print(f"\n[{case.name}] camera_math=diffusers: {err_diffusers:.3e}   camera_math=nvlabs: {err_nvlabs:.3e}")
    assert err_diffusers <= PARITY_RTOL
    assert err_nvlabs > SWITCH_FACTOR * PARITY_RTOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity_is_sensitive_to_the_camera(case, fp32_softmax):
    """Swapping the two trajectories moves the output far beyond the tolerance, and parity still holds."""
    x = _inputs(case)
    swapped = dataclasses.replace(
        x, c2w=x.c2w.flip(0), intrinsics=x.intrinsics.flip(0), raymap=x.raymap.flip(0), plucker=x.plucker.flip(0)
    )
    ref, ref_swapped = run_diffusers(case), run_diffusers(case, swapped)
    assert rel_err(ref_swapped, ref) > 100 * PARITY_RTOL
    assert rel_err(run_ours(case, inputs=swapped), ref_swapped) <= PARITY_RTOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity_with_bf16_softmax(case):
    """As shipped (bf16 Q/K/V in the softmax blocks on both sides): bf16-level agreement."""
    ref = run_diffusers(case)
    err = rel_err(run_ours(case), ref)
    print(f"\n[{case.name}] parity with live bf16 casts: {err:.3e}")
    assert err <= BF16_RTOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_fixture_removes_a_live_bf16_cast(case, monkeypatch):
    """Both models really cast to bf16 as shipped, and the fp32 fixture really removes it in both."""
    ref_bf16, ours_bf16 = run_diffusers(case), run_ours(case)
    monkeypatch.setattr(torch.Tensor, "bfloat16", _no_cast)
    ref_fp32, ours_fp32 = run_diffusers(case), run_ours(case)
    changed_ref, changed_ours = rel_err(ref_bf16, ref_fp32), rel_err(ours_bf16, ours_fp32)
    print(f"\n[{case.name}] bf16 vs fp32 SDPA: diffusers {changed_ref:.3e}, ours {changed_ours:.3e}")
    assert changed_ref > BF16_VISIBLE and changed_ours > BF16_VISIBLE


# -----------------------------------------------------------------------------------------------------------------
# Mixer by mixer, bf16 cast live
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mixers_match_given_identical_inputs(case):
    """Each of our mixers gets the exact input of diffusers' mixer of the same block (bf16 casts live)."""
    theirs, ours = _diffusers_model(case), _our_model(case, "diffusers")
    seen_in, seen_out, our_out, handles = [], [], [], []
    try:
        for block in theirs.blocks:
            handles.append(
                block.attn.register_forward_hook(
                    lambda mod, args, out: seen_in.append(args[0].clone()) or seen_out.append(out.clone())
                )
            )
        for i, block in enumerate(ours.blocks):
            handles.append(block.attn.register_forward_pre_hook(lambda mod, args, i=i: (seen_in[i], *args[1:])))
            handles.append(block.attn.register_forward_hook(lambda mod, args, out: our_out.append(out[0].clone())))
        run_diffusers(case)
        run_ours(case)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen_out) == len(our_out) == case.model["num_layers"]
    report = []
    for i, (ref, out) in enumerate(zip(seen_out, our_out)):
        err = rel_err(out, ref)
        softmax = ours.blocks[i].is_softmax
        report.append(f"block {i} ({'softmax' if softmax else 'GDN'}): {err:.2e}")
        if softmax and case.model["linear_head_dim"] in FLASH_HEAD_DIMS:
            # diffusers hands SDPA its camera Q/K/V as transposed (non-contiguous) views when no head padding is
            # needed; CPU bf16 SDPA accumulates differently for that layout than for our contiguous tensors, so
            # the two outputs differ by bf16 ulps even though their inputs are bit-identical.
            assert err <= BF16_RTOL, report[-1]
        else:
            assert err <= MIXER_RTOL, report[-1]
    print(f"\n[{case.name}] mixers: " + "; ".join(report))


# -----------------------------------------------------------------------------------------------------------------
# The random weights exercise the model
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_random_weights_give_nontrivial_gates(case, monkeypatch):
    gates = []
    original = wm_transformer.GatedDeltaMixer.gates

    def spy(self, x, layout):
        beta, decay = original(self, x, layout)
        gates.append((beta, decay))
        return beta, decay

    monkeypatch.setattr(wm_transformer.GatedDeltaMixer, "gates", spy)
    run_ours(case)
    assert len(gates) == sum(not b.is_softmax for b in _our_model(case, "diffusers").blocks)
    decay = torch.cat([d.flatten() for _, d in gates])
    beta = torch.cat([b.flatten() for b, _ in gates])
    assert 0.05 < decay.min() and decay.max() < 0.99 and decay.std() > 0.05
    assert 0.01 < beta.min() and beta.max() < 0.99 and beta.std() > 0.05
