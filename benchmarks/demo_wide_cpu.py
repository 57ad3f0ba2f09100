"""CPU cost of a demo VAE preset with random weights: the streaming decode of one 3-latent chunk at 256x160,
the DiT's denoising forward of one chunk at that VAE's latent width, and the whole engine at 1 and 2 sessions.

    .venv/bin/python benchmarks/demo_wide_cpu.py [--vaes demo,demo-wide] [--repeats 9] [--engine-chunks 4]

Each time is the minimum (and the median) over ``repeats`` runs, with the presets interleaved, so that a CPU
shared with other work slows every preset alike. The engine rows are ``sana-wm-stream bench``'s measurement
(``stream_server.bench.measure``) of an engine built from the demo DiT (``in_channels`` = the VAE's latent
channels) and the preset's VAE; per chunk the engine runs four denoising forwards and one decode, then the
state-writing forward (the settle phase).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from stream_server.bench import measure
from world_model.config import preset
from world_model.controls import intrinsics_for
from world_model.engine import EngineConfig, StreamingEngine
from world_model.text import HashTextEncoder
from world_model.transformer import SanaWMTransformer
from world_model.vae import VideoVAE

LATENT_HW = (5, 8)  # 160 x 256 pixels
CHUNK = 3  # latent frames of every chunk after the first


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000.0


def decode_case(vae: VideoVAE, batch: int) -> Callable[[], object]:
    """One later 3-latent chunk of ``batch`` sessions, the cache warm (a first chunk and one more decoded)."""
    latent = lambda frames: torch.randn(batch, vae.latent_channels, frames, *LATENT_HW)
    cache = vae.new_decoder_cache()
    vae.decode_chunk(latent(CHUNK + 1), cache)
    vae.decode_chunk(latent(CHUNK), cache)
    z = latent(CHUNK)
    return lambda: vae.decode_chunk(z, cache)


def dit_case(model: SanaWMTransformer, batch: int) -> Callable[[], object]:
    """One denoising forward (the state read, not written) of a later 3-latent chunk of ``batch`` sessions."""
    channels = model.config.in_channels
    text, mask = HashTextEncoder(model.config.caption_channels).encode(["a scene"] * batch)
    frames = 2 * CHUNK + 1 + CHUNK
    c2w = torch.eye(4).expand(batch, 8 * (frames - 1) + 1, 4, 4)
    intrinsics = torch.tensor(intrinsics_for(256, 160), dtype=torch.float32).expand(*c2w.shape[:2], 4)
    state = model.new_state()
    start = 0
    for size in (CHUNK + 1, CHUNK):  # the first chunk and one more written: the window holds sink + previous
        x = torch.randn(batch, channels, size, *LATENT_HW)
        model(x, torch.zeros(batch, size), text, mask, c2w, intrinsics, "streaming", state=state, start_frame=start, write_state=True)
        start += size
    x, t = torch.randn(batch, channels, CHUNK, *LATENT_HW), torch.full((batch, CHUNK), 960.0)
    return lambda: model(x, t, text, mask, c2w, intrinsics, "streaming", state=state, start_frame=start)


def gflop(run: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vaes", default="demo,demo-wide", help="VAE presets (world_model.vae.VAE_PRESETS), comma-separated")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--engine-chunks", type=int, default=4, help="timed engine steps per batch size (0: skip the engine)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.vaes.split(",")
    vaes = {name: VideoVAE.from_preset(name) for name in names}
    dits = {}
    for name, vae in vaes.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dits[name] = SanaWMTransformer(preset("demo", in_channels=vae.latent_channels)).eval()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; min / median of {args.repeats} ms")
    print("preset       params   batch  decode 3 latents ms  GFLOP   DiT forward ms  GFLOP")
    with torch.inference_mode():
        for batch in (1, 2):
            cases = {name: (decode_case(vaes[name], batch), dit_case(dits[name], batch)) for name in names}
            times = {name: ([], []) for name in names}
            for _ in range(args.repeats):
                for name, (decode, forward) in cases.items():
                    times[name][0].append(_timed(decode))
                    times[name][1].append(_timed(forward))
            for name, (decode, forward) in cases.items():
                params = sum(p.numel() for p in vaes[name].model.parameters()) / 1e6
                (d_min, d_med), (f_min, f_med) = ((min(t), statistics.median(t)) for t in times[name])
                print(f"{name:11s} {params:5.2f} M  {batch:5d}  {d_min:8.0f} / {d_med:5.0f}  {gflop(decode):9.1f}"
                      f"   {f_min:6.0f} / {f_med:4.0f}  {gflop(forward):5.1f}")
    for name in names if args.engine_chunks else ():
        engine = StreamingEngine(dits[name], vaes[name], HashTextEncoder(24), EngineConfig(model="demo", width=256, height=160))
        print(f"engine, {name} VAE:", measure(engine, [1, 2], chunks=args.engine_chunks).table())


if __name__ == "__main__":
    main()
