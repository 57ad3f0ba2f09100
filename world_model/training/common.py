"""What the VAE and DiT training scripts share: the clip pool, the resumable loop, checkpoints and the CSV log.

Resuming is exact because nothing random is carried between steps: step ``s`` draws its batch and its
noise from a generator seeded with ``(seed, s)`` (:func:`step_generator`), and the learning rate is a
function of ``s``. A checkpoint therefore needs only the model, the optimizer and the step; a run cut into
slots (``--minutes``, then ``--resume``) follows the same path as an uninterrupted one (bit for bit on CPU).

A run's length fixes its learning-rate schedule. ``--steps 0`` lets the run plan it: at step ``plan_at``
(inside the warm-up, whose learning rate does not depend on the length) it measures its step rate and sets
the length to what the rest of its time budget holds; the checkpoint keeps the planned length for a resume.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from world_model.controls import intrinsics_for
from world_model.training.dataset import check_clip_length, read_shard, render_clip
from world_model.vae import VideoVAE

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.csv"


# ---- data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipPool:
    """The training clips, held in memory (a few thousand 256x160 clips fit easily on the GPU hosts)."""

    frames: np.ndarray  # (N, F, H, W, 3) uint8
    poses: np.ndarray  # (N, F, 4, 4) float32 camera-to-world, OpenCV axes, frame 0 the identity
    intrinsics: np.ndarray  # (4,) float32 fx, fy, cx, cy in pixels, shared by all clips

    def __len__(self) -> int:
        return len(self.frames)

    @classmethod
    def from_shards(cls, folder: str | Path) -> ClipPool:
        """All ``*.npz`` shards of ``folder`` (written by ``dataset.write_shard``), which must agree on the clip geometry."""
        paths = sorted(Path(folder).glob("*.npz"))
        if not paths:
            raise ValueError(f"{folder}: no *.npz shards")
        shards = [read_shard(p) for p in paths]
        shapes = {s.frames.shape[1:] for s in shards}
        if len(shapes) > 1 or any(not np.allclose(s.intrinsics, shards[0].intrinsics) for s in shards):
            raise ValueError(f"{folder}: shards differ in clip length, size or intrinsics ({sorted(shapes)})")
        return cls(
            frames=np.concatenate([s.frames for s in shards]),
            poses=np.concatenate([s.poses for s in shards]).astype(np.float32),
            intrinsics=shards[0].intrinsics.astype(np.float32),
        )

    @classmethod
    def render(cls, seeds: Sequence[int], frames: int, width: int, height: int, workers: int = 1) -> ClipPool:
        """Render clips ``seeds`` now (deterministic per seed), on ``workers`` processes."""
        check_clip_length(frames)
        jobs = [(seed, frames, width, height) for seed in seeds]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                clips = list(pool.map(_render, jobs))
        else:
            clips = [_render(job) for job in jobs]
        return cls(
            frames=np.stack([video for video, _ in clips]),
            poses=np.stack([poses for _, poses in clips]).astype(np.float32),
            intrinsics=intrinsics_for(width, height).astype(np.float32),
        )


def _render(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, frames, width, height = job
    video, poses, _ = render_clip(seed, frames, width, height)
    return video, poses


def load_clips(data: str | None, clips: int, frames: int, width: int, height: int, workers: int) -> ClipPool:
    """The shards of ``data``, or (without ``data``) clips ``0 .. clips-1`` rendered now."""
    if data:
        return ClipPool.from_shards(data)
    log.info("rendering %d clips of %d frames at %dx%d on %d processes", clips, frames, width, height, workers)
    return ClipPool.render(range(clips), frames, width, height, workers)


def to_pixels(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 clips ``(B, F, H, W, 3)`` -> float video ``(B, 3, F, H, W)`` in [-1, 1] on ``device``."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


@torch.no_grad()
def encode_clips(vae: VideoVAE, pool: ClipPool, *, normalised: bool, batch: int = 4) -> torch.Tensor:
    """Posterior-mode latents ``(N, C, T, h, w)`` float32 (on the CPU) of whole clips; ``normalised``: in the
    model space the DiT sees (as ``VideoVAE.encode_image`` gives), else the raw encoder output."""
    return torch.cat([encode_video(vae, pool.frames[start : start + batch], normalised=normalised).cpu() for start in range(0, len(pool), batch)])


@torch.no_grad()
def encode_video(vae: VideoVAE, frames: np.ndarray, *, normalised: bool = True) -> torch.Tensor:
    """Posterior-mode latents ``(B, C, T, h, w)`` float32 (on the VAE's device) of uint8 clips ``(B, F, H, W, 3)``
    (F = 8k + 1), causally encoded; ``normalised`` as in :func:`encode_clips`."""
    z = vae.model.encode(to_pixels(frames, vae.device).to(vae.dtype), causal=True).latent_dist.mode()
    return vae.normalise(z) if normalised else z.float()


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``: all randomness of a step comes from it, so resuming is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ---- the loop ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation and bookkeeping of a training run (the model's own settings live in each script)."""

    steps: int = 20_000  # length of the whole run and of its learning-rate schedule; 0: planned at step plan_at
    lr: float = 3e-4  # peak learning rate (AdamW)
    warmup: int = 500  # linear warm-up steps, then a cosine decay to lr_floor * lr at ``steps``
    lr_floor: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm
    minutes: float = 28.0  # wall-clock budget of this invocation (a lent GPU slot is 30 minutes)
    end_by: float | None = None  # also stop by this wall-clock time (epoch seconds): the end of a lent device call
    checkpoint_every: int = 500  # steps between checkpoints (one is also written when the budget ends)
    seed: int = 0
    plan_at: int = 30  # with steps = 0: the step at which the rate (measured from step plan_at // 3) plans the length

    def __post_init__(self) -> None:
        if self.steps < 0 or (self.steps == 0 and not 3 <= self.plan_at <= self.warmup):
            raise ValueError(f"steps must be positive, or 0 with 3 <= plan_at <= warmup (the lr up to plan_at must not "
                             f"depend on the length); got steps={self.steps}, plan_at={self.plan_at}, warmup={self.warmup}")


def lr_at(step: int, config: LoopConfig) -> float:
    """Linear warm-up to ``config.lr``, then a cosine down to ``lr_floor * lr`` at ``config.steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.lr_floor + (1 - config.lr_floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# A step's loss: step -> (scalar loss to minimise, extra metrics for the log).
LossFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


def train(model: nn.Module, loss_fn: LossFn, config: LoopConfig, out: Path, *, resume: bool, stop_at: int | None = None) -> int:
    """Optimise ``model`` until ``config.steps``, the time budget or ``stop_at`` (a slot boundary); returns the step reached.

    With ``resume`` it continues from ``out/checkpoint.pt``. A checkpoint is written every
    ``config.checkpoint_every`` steps and when the loop ends; every step is logged to ``out/log.csv``
    (its ``seconds`` column is the wall clock since this invocation began, for throughput). With
    ``config.steps == 0`` the length is planned at step ``config.plan_at`` (the module docstring).
    """
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    step = 0
    if resume:
        step, saved = load_checkpoint(out / CHECKPOINT_NAME, model, optimizer)
        if not config.steps and saved.get("steps"):
            config = dataclasses.replace(config, steps=int(saved["steps"]))
    if not config.steps and step > config.plan_at // 3:
        raise ValueError(f"{out / CHECKPOINT_NAME} is at step {step} with no planned length; resume it with --steps")
    began = time.monotonic()
    deadline = began + 60.0 * config.minutes
    if config.end_by is not None:
        deadline = min(deadline, began + config.end_by - time.time())
    mark = (step, began)  # (step, time) the rate of an unplanned run is measured from

    def end() -> float:  # where this invocation stops: unbounded while the length is not planned yet
        return min(config.steps or math.inf, math.inf if stop_at is None else stop_at)

    model.train()
    with CsvLog(out / LOG_NAME, keep_until=step) as csv_log:
        while step < end() and time.monotonic() < deadline:
            if not config.steps and step == config.plan_at // 3:
                mark = (step, time.monotonic())  # the steps before are warm-up of the device, not the rate
            if not config.steps and step == config.plan_at:
                rate = (step - mark[0]) / (time.monotonic() - mark[1])
                config = dataclasses.replace(config, steps=step + max(1, int(rate * (deadline - time.monotonic()))))
                log.info("%.2f steps/s: planned %d steps", rate, config.steps)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, metrics = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            optimizer.step()
            step += 1
            row = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm, **metrics}
            csv_log.write({**row, "seconds": time.monotonic() - began})  # wall clock of this invocation
            if step % config.checkpoint_every == 0:
                save_checkpoint(out / CHECKPOINT_NAME, model, optimizer, step, config)
    save_checkpoint(out / CHECKPOINT_NAME, model, optimizer, step, config)
    model.eval()
    log.info("stopped at step %d of %s", step, config.steps or "a length not planned yet")
    return step


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and the optimizer stay fp32); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- the command line ------------------------------------------------------------------------------

def add_common_arguments(parser: argparse.ArgumentParser, default_lr: float) -> None:
    """Data, loop and output options shared by both training scripts."""
    loop = LoopConfig()
    parser.add_argument("--data", help="folder of .npz shards (dataset.write_shard); default: render --clips clips now")
    parser.add_argument("--clips", type=int, default=256, help="clips to render when there is no --data")
    parser.add_argument("--frames", type=int, default=49, help="pixel frames per rendered clip (8k + 1)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--workers", type=int, default=1, help="processes that render clips")
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt and log.csv")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--export", help="after training, write the inference weights to this folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=loop.steps,
                        help="length of the whole run (and of the lr schedule); 0: what the time budget holds, planned at --plan-at")
    parser.add_argument("--plan-at", type=int, default=loop.plan_at, help="with --steps 0: the step that measures the rate (<= --warmup)")
    parser.add_argument("--stop-at", type=int, help="end this invocation at this step (default: the end of the run)")
    parser.add_argument("--minutes", type=float, default=loop.minutes, help="wall-clock budget of this invocation")
    parser.add_argument("--end-by", type=float, help="also stop the training by this time (epoch seconds, e.g. a device call's end)")
    parser.add_argument("--lr", type=float, default=default_lr)
    parser.add_argument("--warmup", type=int, default=loop.warmup)
    parser.add_argument("--weight-decay", type=float, default=loop.weight_decay)
    parser.add_argument("--checkpoint-every", type=int, default=loop.checkpoint_every)
    parser.add_argument("--seed", type=int, default=loop.seed)


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The loop settings of the parsed command line."""
    return LoopConfig(
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        minutes=args.minutes,
        end_by=args.end_by,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        plan_at=args.plan_at,
    )



# ---- checkpoints and the log ---------------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, config: LoopConfig) -> None:
    """Model, optimizer and step (the RNG needs no saving, see the module docstring), written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "loop": asdict(config)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore ``model`` and ``optimizer`` from ``path``; returns the step it was written at and its loop settings."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), dict(state.get("loop", {}))


class CsvLog:
    """``log.csv``: one row per step. Opening it drops rows past ``keep_until`` (steps a resumed run redoes)."""

    def __init__(self, path: Path, keep_until: int) -> None:
        kept = [r for r in _read_rows(path) if int(r["step"]) <= keep_until] if keep_until > 0 else []
        self._fields = list(kept[0]) if kept else None
        self._handle = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._handle, self._fields) if self._fields else None
        if self._writer:
            self._writer.writeheader()
            self._writer.writerows(kept)

    def __enter__(self) -> CsvLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def write(self, row: dict[str, float]) -> None:
        """Append a row (floats to 6 significant digits); the columns are those of the first row."""
        if self._writer is None:
            self._writer = csv.DictWriter(self._handle, list(row))
            self._writer.writeheader()
        self._writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self._handle.flush()


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_log(path: Path) -> Iterator[dict[str, float]]:
    """The rows of a ``log.csv`` as numbers."""
    for row in _read_rows(path):
        yield {k: float(v) for k, v in row.items()}


def parameter_bytes(model: nn.Module, bytes_per_value: int = 2) -> int:
    """Size of the model's state dict stored at ``bytes_per_value`` (2: bf16 / fp16)."""
    return sum(t.numel() for t in model.state_dict().values()) * bytes_per_value
