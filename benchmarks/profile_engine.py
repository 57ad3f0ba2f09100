"""Where a steady-state engine step spends its GPU time (torch.profiler), by kernel family.

    python benchmarks/profile_engine.py --model sana-wm-streaming --device cuda --dtype bf16 --sessions 1

Random weights; sessions are warmed past their first two chunks, then one step is profiled. Prints the
GPU time of each part of the model (GDN and softmax mixers, cross-attention, FFN, the rest of the DiT, VAE
decode; from profiler ranges around those modules), a split by kernel family, and the top CUDA kernels.
With ``--compile`` the blocks are compiled whole, so only the DiT / VAE split is reported.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from world_model.controls import CameraRig
from world_model.engine import build_engine
from world_model.engine_api import ChunkRequest
from world_model.transformer import GatedDeltaMixer

FAMILIES = (
    ("gdn scan", ("frame_gdn",)),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere_", "sgemm", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
    ("convolution", ("conv", "implicit", "winograd", "nchw", "nhwc")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "elementwise/other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sana-wm-streaming")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    engine = build_engine(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    print(profile_step(engine, args.sessions, fine=not args.compile))


def profile_step(engine, sessions: int, fine: bool = True, rows: int = 25) -> str:
    """The report of one steady step of ``sessions`` sessions (warmed past their first two chunks), settle included.

    ``fine`` wraps the mixers, cross-attention and FFN halves in ranges too (eager only: in a compiled block they
    would split the graph). The engine's parts are wrapped for this call only."""
    rigs = [CameraRig() for _ in range(sessions)]
    ids = [engine.open_session(prompt=f"scene {i}", seed=i) for i in range(sessions)]
    n = engine.info.chunk_pixel_frames

    def requests():
        return [ChunkRequest(sid, np.stack([rig.step(["w"]) for _ in range(n)])) for sid, rig in zip(ids, rigs)]

    lines = []
    restore = _annotate(engine, fine)
    try:
        for _ in range(3):
            frames = engine.step(requests())[0].frames
        lines.append(f"frames: mean {frames.mean():.1f}, std {frames.std():.1f}, "
                     f"saturated {(frames == 0).mean() + (frames == 255).mean():.3f}")
        cuda = engine.info.device.startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        engine.settle()
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            engine.step(requests())
            engine.settle()  # the chunk's state write: the fifth DiT forward
            sync()
    finally:
        restore()
        for sid in ids:
            engine.close_session(sid)
    parts = PARTS if fine else PARTS[:1] + PARTS[-1:]
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    time_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    spans = {e.key: time_of(e) for e in events if e.key in parts}
    step = sum(spans.get(p, 0.0) for p in ("dit", "vae_decode"))
    lines.append(f"sessions {sessions}: parts by GPU span (ms; % of DiT + VAE {step / 1e3:.1f} ms)")
    for name in parts:
        if name in spans:
            lines.append(f"  {name:20s} {spans[name] / 1e3:9.1f} ms  {100 * spans[name] / max(step, 1e-9):5.1f}%")
    split = defaultdict(float)
    for e in events:
        if e.key not in parts:
            split[family(e.key)] += e.self_device_time_total if cuda else e.self_cpu_time_total
    total = sum(split.values())
    lines.append(f"sessions {sessions}: GPU kernel time {total / 1e3:.1f} ms")
    for fam, us in sorted(split.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {fam:20s} {us / 1e3:9.1f} ms  {100 * us / total:5.1f}%")
    lines.append(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                           row_limit=rows, max_name_column_width=90))
    return "\n".join(lines)


PARTS = ["dit", "gdn_mixer", "softmax_mixer", "cross_attention", "ffn_spatial", "ffn_temporal", "vae_decode"]


def _annotate(engine, fine: bool):
    """Wrap the engine's parts in profiler ranges (named as in PARTS); the GPU span of each range is its time.
    Returns the function that takes the wrappers off again."""
    wrapped = [(engine.model, "stream_chunk", "dit"), (engine.vae, "decode_chunk", "vae_decode")]
    if fine:
        for block in engine.model.blocks:
            mixer = "gdn_mixer" if isinstance(block.attn, GatedDeltaMixer) else "softmax_mixer"
            wrapped += [(block.attn, "forward", mixer), (block.cross_attn, "forward", "cross_attention"),
                        (block.mlp, "spatial", "ffn_spatial"), (block.mlp, "temporal", "ffn_temporal")]
    for owner, attr, name in wrapped:
        setattr(owner, attr, _ranged(getattr(owner, attr), name))

    def restore():
        for owner, attr, _ in wrapped:
            delattr(owner, attr)  # the instance attribute goes; the class's method shows through again

    return restore


def _ranged(fn, name):
    def ranged(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return ranged


if __name__ == "__main__":
    main()
