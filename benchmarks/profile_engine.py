"""Where a steady-state engine step spends its GPU time (torch.profiler), by kernel family.

    python benchmarks/profile_engine.py --model sana-wm-streaming --device cuda --dtype bf16 --sessions 1

Random weights; sessions are warmed past their first two chunks, then one step is profiled. Prints the
top CUDA kernels and a split into GEMM / attention / GDN-scan-like / convolution (VAE) / elementwise.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from world_model.controls import CameraRig
from world_model.engine import build_engine
from world_model.engine_api import ChunkRequest

FAMILIES = (
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
    rigs = [CameraRig() for _ in range(args.sessions)]
    ids = [engine.open_session(prompt=f"scene {i}", seed=i) for i in range(args.sessions)]
    n = engine.info.chunk_pixel_frames

    def requests():
        return [ChunkRequest(sid, np.stack([rig.step(["w"]) for _ in range(n)])) for sid, rig in zip(ids, rigs)]

    for _ in range(3):
        frames = engine.step(requests())[0].frames
    print(f"frames: mean {frames.mean():.1f}, std {frames.std():.1f}, saturated {(frames == 0).mean() + (frames == 255).mean():.3f}")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step(requests())
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    split = defaultdict(float)
    for e in events:
        split[family(e.key)] += e.self_device_time_total
    total = sum(split.values())
    print(f"sessions {args.sessions}: GPU kernel time {total / 1e3:.1f} ms")
    for fam, us in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:20s} {us / 1e3:9.1f} ms  {100 * us / total:5.1f}%")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
