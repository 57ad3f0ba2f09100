"""Compare engine variants on one GPU in one process: the engine's default (bf16, TF32, the Triton GDN kernel),
the plain-torch GDN reference, compiled blocks, FP8 block linears.

    python benchmarks/gpu_variants.py [--sessions 1,4] [--variants naive,tf32,compile,fp8,fp8_compile]

Full preset, random weights, bf16. For each variant: build time, chunk p50 per batch size (bench.measure)
and, against the first variant, the largest uint8 difference of the first two chunks of one session.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from stream_server.bench import measure
from world_model.controls import CameraRig
from world_model.engine import build_engine
from world_model.engine_api import ChunkRequest
from world_model.ops import gated_delta

from profile_engine import profile_step  # benchmarks/, this script's folder

# Engine options and the GDN backend (world_model.ops.gated_delta) of each variant; "auto" is the engine's default
# (the Triton kernel on CUDA), "naive" the plain-torch reference.
VARIANTS = {
    "highest": ({"tf32": False}, "naive"),
    "naive": ({"tf32": True}, "naive"),
    "tf32": ({"tf32": True}, "auto"),
    "factored": ({"tf32": True}, "factored"),  # the GDN as batched GEMMs over whole frames (ops/gated_delta/factored.py)
    "compile": ({"tf32": True, "compile": True}, "auto"),
    "compile_factored": ({"tf32": True, "compile": True}, "factored"),
    "channels_last": ({"tf32": True}, "auto"),  # + every DiT Conv2d weight in channels-last (cuDNN depthwise)
    "fp8": ({"tf32": True, "dtype": "fp8"}, "auto"),
    "fp8_compile": ({"tf32": True, "dtype": "fp8", "compile": True}, "auto"),
    "fp8_compile_factored": ({"tf32": True, "dtype": "fp8", "compile": True}, "factored"),
}


def conv_weights_channels_last(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def two_chunks(engine) -> tuple[np.ndarray, np.ndarray]:
    """Frames and latents of one session's first two chunks (fixed seed and path)."""
    sid, rig = engine.open_session(prompt="parity", seed=7), CameraRig()
    out = [engine.step([ChunkRequest(sid, np.stack([rig.step(["w", "d"]) for _ in range(24)]))])[0] for _ in range(2)]
    engine.close_session(sid)
    return np.concatenate([r.frames for r in out]), np.concatenate([r.latents for r in out], axis=1).astype(np.float32)


def drift(frames: np.ndarray, latents: np.ndarray, reference: dict) -> str:
    pixels = np.abs(frames.astype(int) - reference["frames"].astype(int))
    scale = np.abs(reference["latents"]).max()
    lat = np.abs(latents - reference["latents"])
    return (f"vs {reference['name']}: frames max |diff| {int(pixels.max())}, mean {pixels.mean():.3f} levels; "
            f"latents max |diff| {lat.max() / scale:.2e}, mean {lat.mean() / scale:.2e} of their max")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--variants", default="highest,tf32,compile")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="then profile one step at the largest batch size")
    parser.add_argument("--reference", help="an .npz of the first variant's two chunks: compared against if it exists, "
                                            "else written (so that variants run in separate processes compare too)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sessions.split(",")]
    reference = {k: v for k, v in np.load(args.reference).items()} if args.reference and os.path.exists(args.reference) else None
    for name in args.variants.split(","):
        options, backend = VARIANTS[name]
        os.environ[gated_delta.BACKEND_ENV] = backend
        start = time.perf_counter()
        engine = build_engine("sana-wm-streaming", device="cuda", **{"dtype": "bf16", **options})
        if name == "channels_last":
            conv_weights_channels_last(engine.model)
        built = time.perf_counter() - start
        start = time.perf_counter()
        frames, latents = two_chunks(engine)
        first = time.perf_counter() - start
        if reference is None:
            reference = {"name": np.array(name), "frames": frames, "latents": latents}
            if args.reference:
                np.savez(args.reference, **reference)
        print(f"== {name}: build {built:.1f} s, first two chunks {first:.1f} s; {drift(frames, latents, reference)}", flush=True)
        result = measure(engine, sizes, chunks=args.chunks)
        print(result.table(), flush=True)
        if args.profile:
            print(profile_step(engine, max(sizes), fine=not options.get("compile"), rows=40), flush=True)
        del engine
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
