"""Time the streaming causal-VAE decode of one chunk per batch size, for a few ways of running it.

    python benchmarks/vae_gpu.py [--preset ltx2] [--sessions 1,4] [--variants eager,channels_last,compile,channels_last_compile]
                                 [--cudnn-benchmark] [--compile-mode max-autotune-no-cudagraphs]

Random bf16 weights, 22 x 40 latents (1280 x 704), 3-latent chunks after a first 4-latent chunk; the cache is
warm. For each variant: milliseconds per decode (p50 of 5), peak memory, the time of the untimed first chunks (where
compiled variants compile) and, against the first variant, the largest and mean uint8 difference of the decoded
frames. Compiled variants compile ``VideoVAE.compile_decoder``'s two graphs (first chunk, later chunks) on their
first calls; the next batch size recompiles once with a dynamic batch, also in the untimed chunks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from world_model.vae import VideoVAE

# name: (decoder weights in channels-last-3d, compiled)
VARIANTS = {
    "eager": (False, False),
    "channels_last": (True, False),
    "compile": (False, True),
    "channels_last_compile": (True, True),
}


def decode_times(vae: VideoVAE, batch: int, channels_last: bool, repeats: int = 5) -> tuple[float, float, torch.Tensor]:
    """(p50 ms of a later chunk, seconds of the untimed first two chunks, the last chunk's frames)."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    latent = lambda frames: torch.randn(batch, vae.latent_channels, frames, 22, 40, generator=gen, device="cuda").to(vae.dtype)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    cache = vae.new_decoder_cache()
    start = time.perf_counter()
    vae.decode_chunk(latent(4).contiguous(memory_format=fmt), cache)
    times, out, untimed = [], None, 0.0
    for i in range(repeats + 1):
        z = latent(3).contiguous(memory_format=fmt)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = vae.decode_chunk(z, cache)
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
        if i == 0:
            untimed = time.perf_counter() - start
    return statistics.median(times[1:]), untimed, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="ltx2")
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--variants", default="eager,channels_last,compile,channels_last_compile", help=", ".join(VARIANTS))
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark for every variant")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled variants")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sessions.split(",")]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    reference: dict[int, torch.Tensor] = {}
    for name in args.variants.split(","):
        channels_last, compiled = VARIANTS[name]
        vae = VideoVAE.from_preset(args.preset, seed=0, device="cuda", dtype=torch.bfloat16)
        if channels_last:
            vae.model.decoder.to(memory_format=torch.channels_last_3d)
        if compiled:
            vae.compile_decoder(mode=args.compile_mode)
        rows = []
        for batch in sizes:
            torch.manual_seed(0)
            torch.cuda.reset_peak_memory_stats()
            try:
                ms, untimed, out = decode_times(vae, batch, channels_last)
            except Exception as exc:  # a variant that does not run is reported, not fatal
                rows.append(f"batch {batch}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                break
            peak = torch.cuda.max_memory_allocated() / 2**30
            pixels = ((out.float().clamp(-1, 1) + 1) * 127.5).round()
            ref = reference.get(batch)
            if ref is None:
                diff = ""
            elif ref.shape != pixels.shape:  # e.g. a decoder that lost the streaming cache's frames
                diff = f", WRONG OUTPUT: shape {tuple(pixels.shape)} instead of {tuple(ref.shape)}"
            else:
                delta = (pixels - ref).abs()
                diff = f", frames vs {args.variants.split(',')[0]}: max |diff| {int(delta.max())}, mean {delta.mean():.3f} levels"
            reference.setdefault(batch, pixels)
            rows.append(f"batch {batch}: {ms:8.1f} ms per chunk, {ms / batch:7.1f} ms per session, peak {peak:.1f} GiB, "
                        f"first chunks {untimed:.1f} s{diff}")
        print(f"== {name}: " + "; ".join(rows), flush=True)
        del vae
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
