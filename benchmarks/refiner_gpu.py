"""The release-size refiner (13.0 B video parameters, random bf16 weights) refining a 60 s recording.

    python benchmarks/refiner_gpu.py [--seconds 60] [--decode] [--compile]

Stage-1 latents of ``--seconds`` of 1280x704 video at 16 fps (8k+1 frames -> k+1 latents), random; the
chunk-autoregressive recipe (sink + 10 history, 3-latent blocks, 3 steps + 1 capture forward each). Weights are
drawn on the GPU (N(0, 0.02), as ``Refiner.from_preset`` does there), so a run starts in seconds. Prints the
refiner time, the optional causal-VAE decode time of the refined latents, and peak GPU memory. With
``--compile`` each transformer block goes through torch.compile; the first blocks then pay for compiling (the
K/V window grows for 10 latents), so the steady time (median block × blocks) is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from world_model.refiner import Refiner, random_on_device, refiner_transformer
from world_model.text import HashTextEncoder
from world_model.vae import VideoVAE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--decode", action="store_true", help="also decode the refined latents (streaming VAE)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    args = parser.parse_args()
    latent_frames = int(args.seconds * 16) // 8 + 1
    start = time.perf_counter()
    model = random_on_device(refiner_transformer("ltx2", device="meta"), 0, torch.bfloat16, "cuda")
    params = sum(p.numel() for p in model.parameters())
    if args.compile:
        for block in model.transformer_blocks:
            block.compile()
    refiner = Refiner(model, HashTextEncoder(model.config.caption_channels, 32, device="cuda", dtype=torch.bfloat16))
    print(f"refiner: {params / 1e9:.2f} B parameters (video only), built in {time.perf_counter() - start:.1f} s", flush=True)
    latents = torch.randn(1, model.config.in_channels, latent_frames, 22, 40, device="cuda", dtype=torch.bfloat16)
    vae = VideoVAE.from_preset("ltx2", dtype=torch.bfloat16, device="cuda") if args.decode else None
    cache = vae.new_decoder_cache() if vae else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    refine_s = decode_s = 0.0
    block_s = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for block in refiner.refine_blocks(latents, "a harbour at dusk", seed=0):
            torch.cuda.synchronize()
            block_s.append(time.perf_counter() - t0)
            refine_s += block_s[-1]
            if vae is not None:
                t1 = time.perf_counter()
                vae.to_uint8(vae.decode_chunk(block, cache))
                torch.cuda.synchronize()
                decode_s += time.perf_counter() - t1
            t0 = time.perf_counter()
    steady = statistics.median(block_s) * len(block_s)
    print(f"{args.seconds:g} s of video = {latent_frames} latents: refiner {refine_s:.1f} s ({len(block_s)} blocks; "
          f"steady {steady:.1f} s)"
          + (f", VAE decode {decode_s:.1f} s" if vae else "")
          + f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
