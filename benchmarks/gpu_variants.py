"""Compare engine variants on one GPU in one process: eager fp32-matmul GDN, TF32 GDN, compiled blocks.

    python benchmarks/gpu_variants.py [--sessions 1,4] [--variants highest,tf32,compile]

Full preset, random weights, bf16. For each variant: build time, chunk p50 per batch size (bench.measure)
and, against the first variant, the largest uint8 difference of the first two chunks of one session.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stream_server.bench import measure
from world_model.controls import CameraRig
from world_model.engine import build_engine
from world_model.engine_api import ChunkRequest

VARIANTS = {
    "highest": {"tf32": False},
    "tf32": {"tf32": True},
    "compile": {"tf32": True, "compile": True},
    "channels_last": {"tf32": True},  # + every DiT Conv2d weight in channels-last (cuDNN depthwise instead of the generic kernel)
}


def conv_weights_channels_last(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def two_chunks(engine) -> np.ndarray:
    sid, rig = engine.open_session(prompt="parity", seed=7), CameraRig()
    out = [engine.step([ChunkRequest(sid, np.stack([rig.step(["w", "d"]) for _ in range(24)]))])[0].frames for _ in range(2)]
    engine.close_session(sid)
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--variants", default="highest,tf32,compile")
    parser.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sessions.split(",")]
    reference = None
    for name in args.variants.split(","):
        start = time.perf_counter()
        engine = build_engine("sana-wm-streaming", device="cuda", dtype="bf16", **VARIANTS[name])
        if name == "channels_last":
            conv_weights_channels_last(engine.model)
        built = time.perf_counter() - start
        start = time.perf_counter()
        frames = two_chunks(engine)
        first = time.perf_counter() - start
        diff = "" if reference is None else f", max |frame diff| vs {args.variants.split(',')[0]}: {int(np.abs(frames.astype(int) - reference.astype(int)).max())}, mean {np.abs(frames.astype(int) - reference.astype(int)).mean():.3f}"
        reference = frames if reference is None else reference
        result = measure(engine, sizes, chunks=args.chunks)
        print(f"== {name}: build {built:.1f} s, first two chunks {first:.1f} s{diff}", flush=True)
        print(result.table(), flush=True)
        del engine
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
