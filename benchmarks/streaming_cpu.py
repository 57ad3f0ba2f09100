"""Stage-1 streaming throughput of a preset on this machine (random weights; no VAE decode yet).

    .venv/bin/python benchmarks/streaming_cpu.py [--preset tiny] [--latent 4x8] [--chunks 8] [--threads 2]

Prints seconds of video generated per wall-clock second (one chunk = 3 latents = 24 frames = 1.5 s at
16 fps; 5 DiT forwards per chunk) and the session state size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from world_model.config import preset
from world_model.sampler import SamplerConfig, chunk_spans, sample_chunk
from world_model.transformer import SanaWMTransformer

FPS = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--latent", default="4x8", help="latent rows x columns (pixels are 32x)")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = map(int, args.latent.split("x"))
    cfg = preset(args.preset)
    model = SanaWMTransformer(cfg).eval()
    spans = chunk_spans(4 + 3 * (args.chunks - 1), SamplerConfig())
    frames = spans[-1][1]
    pixel = 8 * (frames - 1) + 1
    c2w = torch.eye(4).repeat(1, pixel, 1, 1)
    c2w[..., 2, 3] = torch.linspace(0, 2, pixel)
    intr = torch.tensor([w * 32.0, w * 32.0, w * 16.0, h * 16.0]).repeat(1, pixel, 1)
    text, mask = torch.randn(1, 16, cfg.caption_channels), torch.ones(1, 16, dtype=torch.bool)
    state = model.new_state(1)
    times = []
    with torch.inference_mode():
        for start, end in spans:
            noise = torch.randn(1, cfg.in_channels, end - start, h, w)

            def denoise(x, t, write, start=start):
                return model(x, t, text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=write)

            t0 = time.perf_counter()
            sample_chunk(denoise, noise, SamplerConfig(), noise[:, :, 0] if start == 0 else None)
            times.append(time.perf_counter() - t0)
    steady = times[1:]
    chunk_s = statistics.median(steady)
    video_s = 3 * 8 / FPS
    print(f"preset {args.preset}, latent {h}x{w} ({h * 32}x{w * 32} px), {args.threads} threads, {len(steady)} steady chunks")
    print(f"chunk (3 latents, 5 forwards): median {chunk_s * 1000:.1f} ms, max {max(steady) * 1000:.1f} ms")
    print(f"video seconds per second: {video_s / chunk_s:.1f}  (Stage-1 only)")
    print(f"state bytes per session: {state.nbytes:,}")


if __name__ == "__main__":
    main()
