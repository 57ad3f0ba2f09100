"""Time the streaming causal-VAE decode of one chunk per batch size, for a few ways of running it.

    python benchmarks/vae_gpu.py [--preset ltx2] [--sessions 1,4] [--variants eager,channels_last,compile]

Random bf16 weights, 22 x 40 latents (1280 x 704), 3-latent chunks after a first 4-latent chunk; the cache is
warm. For each variant: milliseconds per decode (p50 of 5) and, against the first variant, the largest uint8
difference of the decoded frames.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from world_model.vae import VideoVAE


def decode_times(vae: VideoVAE, batch: int, channels_last: bool, repeats: int = 5) -> tuple[float, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(batch)
    latent = lambda frames: torch.randn(batch, vae.latent_channels, frames, 22, 40, generator=gen, device="cuda").to(vae.dtype)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    cache = vae.new_decoder_cache()
    vae.decode_chunk(latent(4).contiguous(memory_format=fmt), cache)
    times, out = [], None
    for _ in range(repeats + 1):
        z = latent(3).contiguous(memory_format=fmt)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = vae.decode_chunk(z, cache)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:]), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="ltx2")
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--variants", default="eager,channels_last,compile")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sessions.split(",")]
    reference: dict[int, torch.Tensor] = {}
    for name in args.variants.split(","):
        vae = VideoVAE.from_preset(args.preset, seed=0, device="cuda", dtype=torch.bfloat16)
        channels_last = name in ("channels_last", "channels_last_compile")
        if channels_last:
            vae.model.decoder.to(memory_format=torch.channels_last_3d)
        if name.endswith("compile"):
            vae.model.decoder.compile()
        rows = []
        for batch in sizes:
            torch.manual_seed(0)
            try:
                ms, out = decode_times(vae, batch, channels_last)
            except Exception as exc:  # a variant that does not run is reported, not fatal
                rows.append(f"batch {batch}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                break
            pixels = ((out.float().clamp(-1, 1) + 1) * 127.5).round()
            ref = reference.get(batch)
            if ref is None:
                diff = ""
            elif ref.shape != pixels.shape:  # e.g. a compiled decoder that lost the streaming cache's frames
                diff = f", WRONG OUTPUT: shape {tuple(pixels.shape)} instead of {tuple(ref.shape)}"
            else:
                diff = f", max |frame diff| {int((pixels - ref).abs().max())}"
            reference.setdefault(batch, pixels)
            rows.append(f"batch {batch}: {ms:8.1f} ms per chunk, {ms / batch:7.1f} ms per session{diff}")
        print(f"== {name}: " + "; ".join(rows), flush=True)
        del vae
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
