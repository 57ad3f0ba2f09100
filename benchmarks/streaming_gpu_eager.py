"""Eager Stage-1 streaming chunk time of the full model on one GPU (random bf16 weights, plain-torch GDN).

    python benchmarks/streaming_gpu_eager.py [--batch 1] [--chunks 4]

The baseline before GPU kernels: the frame-wise delta rule runs as the plain-torch loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from world_model.config import preset
from world_model.sampler import SamplerConfig, chunk_spans, sample_chunk
from world_model.transformer import SanaWMTransformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    with torch.device("meta"):
        model = SanaWMTransformer(preset("sana-wm-streaming"))
    model = model.to_empty(device=dev).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    h, w, b = 22, 40, args.batch
    spans = chunk_spans(4 + 3 * (args.chunks - 1), SamplerConfig())
    pixel = 8 * (spans[-1][1] - 1) + 1
    c2w = torch.eye(4, device=dev).repeat(b, pixel, 1, 1)
    c2w[..., 2, 3] = torch.linspace(0, 2, pixel, device=dev)
    intr = torch.tensor([1000.0, 1000.0, 640.0, 352.0], device=dev).repeat(b, pixel, 1)
    text = torch.randn(b, 300, 2304, device=dev)
    mask = torch.ones(b, 300, dtype=torch.bool, device=dev)
    state = model.new_state(b)
    times, forwards = [], []
    with torch.inference_mode():
        for start, end in spans:
            noise = torch.randn(b, 128, end - start, h, w, device=dev)

            def denoise(x, t, write, start=start):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                v = model(x, t.to(dev), text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=write)
                torch.cuda.synchronize()
                forwards.append(time.perf_counter() - t0)
                return v

            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sample_chunk(denoise, noise, SamplerConfig(), noise[:, :, 0] if start == 0 else None)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    steady = times[1:]
    print(f"{torch.cuda.get_device_name()} batch {b}: chunk median {statistics.median(steady) * 1000:.0f} ms "
          f"(all {[round(t * 1000) for t in times]}), forward median {statistics.median(forwards[5:]) * 1000:.0f} ms, "
          f"realtime x{1.5 * b / statistics.median(steady):.2f}, state {state.nbytes / 2**20:.1f} MiB, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
