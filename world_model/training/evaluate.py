"""Does a trained demo model answer the camera? Measurements on held-out scenes against the renderer.

Every check starts a session from the renderer's first frame of a held-out scene (seeds far from the
training seeds 0 .. N-1), steers it with one held key and measures the generated video:

- **motion**: global image motion between consecutive frames by phase correlation. Turning left
  (``a``) moves the picture right, turning right (``d``) left; looking up (``i``) moves it down, down
  (``k``) up. A pair counts as right when its shift has the sign the renderer gives for the same key.
- **expansion**: walking forward (``w``) pushes the left half of the picture left and the right half
  right (the image expands); backward (``s``) the reverse.
- **fidelity**: PSNR of the generated video against the renderer's ground truth along the same
  trajectory, next to the baseline that repeats the first frame.
- **stability**: mean absolute difference between consecutive frames and the frame's spatial standard
  deviation over a long steered session (a frozen or blank picture shows as near zero).
- **reconstruction** (``--vae``, no DiT): the motion shares and the PSNR of a VAE's own reconstruction of the
  renderer's clips, the most the DiT can reach through that decoder.

    python -m world_model.training.evaluate --checkpoint runs/demo [--seeds 5] [--device cuda] [--json]
    python -m world_model.training.evaluate --vae runs/demo/vae [--seeds 3]
    python -m world_model.training.evaluate --long-chunks 200 --sheet long.png   # + 5 minutes of steering
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from world_model.controls import intrinsics_for, trajectory
from world_model.engine import StreamingEngine, build_engine
from world_model.engine_api import ChunkRequest
from world_model.start_scenes import DEMO_PROMPT
from world_model.training.common import encode_video
from world_model.training.metrics import phase_correlation
from world_model.training.scenes import Scene
from world_model.vae import VideoVAE

HELD_OUT_SEED = 1_000_000  # training clips use seeds 0 .. clips-1
TURNS = {"a": ("dx", 1.0), "d": ("dx", -1.0), "i": ("dy", 1.0), "k": ("dy", -1.0)}  # key -> axis, expected sign
MOVES = {"w": 1.0, "s": -1.0}  # key -> sign of the expansion


def steer(engine: StreamingEngine, start: np.ndarray, script: str, chunks: int, seed: int = 0) -> np.ndarray:
    """Frames ``(F, H, W, 3)`` uint8 of a session started from ``start`` and driven by ``script``, the start frame first."""
    per_chunk = engine.info.chunk_pixel_frames
    poses = trajectory(script, chunks * per_chunk + 1)[1:]
    sid = engine.open_session(prompt=DEMO_PROMPT, image=start, seed=seed)
    try:
        frames = [start]
        for c in range(chunks):
            (result,) = engine.step([ChunkRequest(sid, poses[c * per_chunk : (c + 1) * per_chunk])])
            frames.extend(result.frames)
    finally:
        engine.close_session(sid)
    return np.stack(frames)


def ground_truth(seed: int, script: str, frames: int, width: int, height: int) -> np.ndarray:
    """The renderer's frames ``(frames, H, W, 3)`` of scene ``seed`` along ``script``."""
    scene = Scene(seed)
    intrinsics = intrinsics_for(width, height)
    return np.stack([scene.render(pose, intrinsics, width, height) for pose in trajectory(script, frames)])


def shifts(video: np.ndarray, gap: int = 1) -> np.ndarray:
    """``(F - gap, 2)`` phase-correlation shifts ``(dy, dx)`` from frame ``i`` to frame ``i + gap``."""
    return np.array([phase_correlation(a, b) for a, b in zip(video[:-gap], video[gap:])])


def expansion(video: np.ndarray, gap: int = 1) -> np.ndarray:
    """``(F - gap,)`` horizontal shift of the right half minus that of the left half, per frame pair."""
    half = video.shape[2] // 2
    left = shifts(video[:, :, :half], gap)[:, 1]
    right = shifts(video[:, :, half:], gap)[:, 1]
    return right - left


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


@dataclass
class Report:
    motion: dict[str, float] = field(default_factory=dict)  # key -> share of consecutive frame pairs moving the right way
    motion_truth: dict[str, float] = field(default_factory=dict)  # the same share for the renderer's video
    motion_latent: dict[str, float] = field(default_factory=dict)  # the share for pairs one latent frame (8 frames) apart
    psnr: float = 0.0  # generated vs ground truth, mean over scenes
    psnr_repeat_first: float = 0.0  # first frame repeated vs ground truth
    stability: dict[str, float] = field(default_factory=dict)


def motion(engine: StreamingEngine, seeds: Sequence[int], chunks: int = 2, gaps: Sequence[int] = (1,)) -> tuple[dict, dict]:
    """For each gap and key, the share of frame pairs ``gap`` frames apart that move the right way, for the
    generated video and for the renderer's (the check of the check): ``({gap: {key: share}}, {gap: {key: share}})``."""
    frames = chunks * engine.info.chunk_pixel_frames + 1
    make = lambda truth, script, seed: steer(engine, truth[0], script, chunks, seed)
    return _motion_shares(make, seeds, frames, engine.info.width, engine.info.height, gaps)


def _motion_shares(make, seeds: Sequence[int], frames: int, width: int, height: int, gaps: Sequence[int]) -> tuple[dict, dict]:
    """:func:`motion` for videos ``make(truth, script, seed)`` made from each key's ground truth."""
    counts = {(gap, key): [0, 0, 0] for gap in gaps for key in [*TURNS, *MOVES]}  # right, right in truth, pairs
    for seed in seeds:
        for key in [*TURNS, *MOVES]:
            truth = ground_truth(seed, f"{key}-{frames}", frames, width, height)
            video = make(truth, f"{key}-{frames}", seed)
            for gap in gaps:
                if key in TURNS:
                    axis, sign = TURNS[key]
                    column = 0 if axis == "dy" else 1
                    got, want = shifts(video, gap)[:, column] * sign, shifts(truth, gap)[:, column] * sign
                else:
                    got, want = expansion(video, gap) * MOVES[key], expansion(truth, gap) * MOVES[key]
                count = counts[gap, key]
                count[0] += int((got > 0).sum())
                count[1] += int((want > 0).sum())
                count[2] += len(got)
    generated = {gap: {key: counts[gap, key][0] / counts[gap, key][2] for key in [*TURNS, *MOVES]} for gap in gaps}
    rendered = {gap: {key: counts[gap, key][1] / counts[gap, key][2] for key in [*TURNS, *MOVES]} for gap in gaps}
    return generated, rendered


FIDELITY_SCRIPT = "w-12, d-10, w-10, a-14, s-8, i-6, k-6, l-10"


def fidelity(engine: StreamingEngine, seeds: Sequence[int], chunks: int) -> tuple[float, float]:
    """Mean PSNR against the renderer along :data:`FIDELITY_SCRIPT` (repeated), and that of repeating the first frame."""
    width, height = engine.info.width, engine.info.height
    frames = chunks * engine.info.chunk_pixel_frames + 1
    script = ", ".join([FIDELITY_SCRIPT] * (1 + frames // 76))
    psnrs, repeats = [], []
    for seed in seeds:
        truth = ground_truth(seed, script, frames, width, height)
        video = steer(engine, truth[0], script, chunks, seed)
        psnrs.append(psnr(video[1:], truth[1:]))
        repeats.append(psnr(np.broadcast_to(truth[:1], truth[1:].shape), truth[1:]))
    return float(np.mean(psnrs)), float(np.mean(repeats))


STABILITY_SCRIPT = "w-40, d-24, w-40, a-30, s-20, l-30, i-8, k-8, j-30, none-10"


def long_session(engine: StreamingEngine, seed: int, chunks: int) -> np.ndarray:
    """``chunks`` chunks of the stability script, steered from the renderer's view of scene ``seed``."""
    width, height, per_chunk = engine.info.width, engine.info.height, engine.info.chunk_pixel_frames
    start = ground_truth(seed, "none-1", 1, width, height)[0]
    return steer(engine, start, ", ".join([STABILITY_SCRIPT] * (1 + chunks * per_chunk // 240)), chunks, seed)


def stability(video: np.ndarray, fps: int, chunk_frames: int) -> dict[str, float]:
    """Frame-to-frame change and spatial spread over the first and the last four chunks of a long steered session
    ``video`` (:func:`long_session`), and the spread of every 15 s (``spatial_std_{t}s``). Spread is contrast, not
    structure: a streaky texture keeps it, so a :func:`contact_sheet` of the session is worth a look too."""
    diff = np.abs(np.diff(video.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    spread = video.astype(np.float32).std(axis=(1, 2)).mean(axis=-1)
    first, last = slice(1, chunk_frames * 4 + 1), slice(-chunk_frames * 4, None)
    measured = {
        "frame_diff_first": float(diff[first].mean()),
        "frame_diff_last": float(diff[last].mean()),
        "spatial_std_first": float(spread[first].mean()),
        "spatial_std_last": float(spread[last].mean()),
    }
    span = 15 * fps
    for start_frame in range(0, len(spread) - span + 1, span):
        measured[f"spatial_std_{start_frame // fps}s"] = float(spread[start_frame : start_frame + span].mean())
    return measured


def contact_sheet(video: np.ndarray, fps: int, seconds: Sequence[float] = (0, 5, 10, 20, 40, 60, 120, 180, 240, 300), columns: int = 5) -> np.ndarray:
    """The frames of ``video`` ``(F, H, W, 3)`` at ``seconds`` (the last frame for times past its end), tiled
    ``columns`` to a row, as one uint8 image."""
    tiles = [video[min(len(video) - 1, round(t * fps))] for t in seconds]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    return np.concatenate([np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)], axis=0)


def reconstruct(vae: VideoVAE, video: np.ndarray) -> np.ndarray:
    """The VAE's causal encode and one-shot decode of a clip ``(F, H, W, 3)`` uint8 (F = 8k + 1), in uint8."""
    return vae.to_uint8(vae.decode(encode_video(vae, video[None])))[0]


def reconstruction(vae: VideoVAE, seeds: Sequence[int], frames: int = 49, width: int = 256, height: int = 160) -> dict:
    """Consecutive-frame motion shares of the VAE's reconstruction of each key's ground truth (and the
    renderer's own), and the reconstruction's PSNR over those clips."""
    psnrs = []

    def make(truth: np.ndarray, script: str, seed: int) -> np.ndarray:
        video = reconstruct(vae, truth)
        psnrs.append(psnr(video, truth))
        return video

    generated, rendered = _motion_shares(make, seeds, frames, width, height, gaps=(1,))
    return {"motion": generated[1], "motion_truth": rendered[1], "psnr": float(np.mean(psnrs))}


def evaluate(
    engine: StreamingEngine, seeds: Sequence[int], chunks: int = 2, fidelity_chunks: int = 7, long_chunks: int = 0, sheet: str | None = None
) -> Report:
    """Motion, fidelity (``fidelity_chunks`` chunks: 7 is 10.5 s) and, with ``long_chunks``, stability (and its
    contact sheet at ``sheet``)."""
    report = Report()
    latent_gap = engine.info.chunk_pixel_frames // engine.info.chunk_latent_frames
    generated, rendered = motion(engine, seeds, chunks, gaps=(1, latent_gap))
    report.motion, report.motion_truth, report.motion_latent = generated[1], rendered[1], generated[latent_gap]
    report.psnr, report.psnr_repeat_first = fidelity(engine, seeds, fidelity_chunks)
    if long_chunks:
        video = long_session(engine, seeds[0], long_chunks)
        report.stability = stability(video, engine.info.fps, engine.info.chunk_pixel_frames)
        if sheet is not None:
            Image.fromarray(contact_sheet(video, engine.info.fps)).save(sheet)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="an exported demo folder (default: the built-in weights)")
    parser.add_argument("--seeds", type=int, default=3, help="held-out scenes")
    parser.add_argument("--chunks", type=int, default=2, help="chunks per steered clip")
    parser.add_argument("--fidelity-chunks", type=int, default=7, help="chunks of the PSNR run (7 = 10.5 s)")
    parser.add_argument("--long-chunks", type=int, default=0, help="chunks of the stability run (200 = 5 minutes)")
    parser.add_argument("--sheet", help="with --long-chunks: save frames of the stability run to this PNG")
    parser.add_argument("--vae", help="only a VAE folder's reconstruction of the ground truth (no DiT)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + args.seeds)
    if args.vae:
        vae = VideoVAE.from_pretrained(args.vae, dtype=torch.float32, device=args.device)
        print(json.dumps(reconstruction(vae, seeds, args.chunks * 24 + 1), indent=1 if not args.json else None))
        return
    engine = build_engine(model="demo", checkpoint=args.checkpoint, device=args.device)
    if args.sheet and not args.long_chunks:
        parser.error("--sheet needs --long-chunks")
    report = evaluate(engine, seeds, args.chunks, args.fidelity_chunks, args.long_chunks, args.sheet)
    print(json.dumps(asdict(report), indent=1 if not args.json else None))


if __name__ == "__main__":
    main()
