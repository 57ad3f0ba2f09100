"""Per-session state of the streaming model: the DiT's (from the config alone) and the causal-VAE
decoder cache (a chunk decoded on the meta device: shapes, no memory, no weights).

    .venv/bin/python benchmarks/state_size.py [--preset sana-wm-streaming] [--height 704 --width 1280]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from world_model.config import preset
from world_model.state import layout_nbytes, state_layout
from world_model.vae import VideoVAE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sana-wm-streaming")
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    config = preset(args.preset)
    layout = state_layout(config, (args.height // 32, args.width // 32), torch.bfloat16)
    groups: dict[str, dict] = defaultdict(dict)
    for name, spec in layout.items():
        kind = name.split(".", 2)[2].split(".")[0]
        groups[kind][name] = spec
    mib = 2**20
    print(f"{args.preset} at {args.width}x{args.height}, bf16 weights, B = 1")
    print(f"{'part':<10} {'tensors':>7} {'MiB':>9}")
    for kind, specs in sorted(groups.items()):
        print(f"{kind:<10} {len(specs):>7} {layout_nbytes(specs) / mib:>9.1f}")
    total = layout_nbytes(layout)
    print(f"{'total':<10} {len(layout):>7} {total / mib:>9.1f}  ({total / 2**30:.3f} GiB, {total:,} bytes)")

    vae = VideoVAE.from_preset("ltx2", device="meta", dtype=torch.bfloat16)
    cache = vae.new_decoder_cache()
    vae.decode_chunk(torch.empty(1, vae.latent_channels, 4, args.height // 32, args.width // 32, device="meta"), cache)
    both = total + cache.nbytes
    print(f"VAE decoder cache: {len(cache.tensors())} convs, {cache.nbytes / mib:.1f} MiB; DiT + VAE: {both / mib:.1f} MiB ({both / 2**30:.3f} GiB)")


if __name__ == "__main__":
    main()
