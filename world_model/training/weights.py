"""Rewrite the weights of an exported model folder as files of at most a given size, or as one file again.

A lent GPU hands back files of at most 16 MiB, and the demo DiT is 19.6 MB in bf16. Every loader here reads all
``*.safetensors`` of a folder (``checkpoint.load_state_dict``, ``VideoVAE.from_pretrained``), so a folder
split into shards loads as it is; the package's shipped ``world_model/demo/`` keeps one file per model, so
a trained folder is merged back before it is copied there::

    python -m world_model.training.weights runs/demo "$OUT/demo" --max-mb 15   # shards, configs copied
    python -m world_model.training.weights "$OUT/demo" world_model/demo          # one file per model folder

A folder is rewritten where it holds ``*.safetensors`` (the export's ``transformer/`` and ``vae/``); tensors
keep their dtype and are grouped in name order.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from world_model.checkpoint import load_state_dict

WEIGHTS_STEM = "diffusion_pytorch_model"


def save_weights(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int | None = None) -> list[Path]:
    """Write ``tensors`` to ``folder`` as ``diffusion_pytorch_model.safetensors``, or, past ``max_bytes``, as
    ``diffusion_pytorch_model-00001-of-0000N.safetensors`` shards of at most ``max_bytes`` each (a shard
    holds whole tensors; a tensor larger than ``max_bytes`` is an error). Returns the files written."""
    names = sorted(tensors)
    sizes = {n: tensors[n].numel() * tensors[n].element_size() for n in names}
    too_big = [n for n in names if max_bytes is not None and sizes[n] > max_bytes]
    if too_big:
        raise ValueError(f"tensors larger than one shard of {max_bytes} bytes: {', '.join(too_big)}")
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if max_bytes is not None and groups[-1] and used + sizes[name] > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{WEIGHTS_STEM}*.safetensors"):
        old.unlink()
    if len(groups) == 1:
        paths = [folder / f"{WEIGHTS_STEM}.safetensors"]
    else:
        paths = [folder / f"{WEIGHTS_STEM}-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    for path, group in zip(paths, groups):
        save_file({n: tensors[n].contiguous() for n in group}, str(path))
    return paths


def rewrite_folder(source: Path, target: Path, max_bytes: int | None) -> list[Path]:
    """Copy ``source`` to ``target``, each folder's safetensors rewritten by :func:`save_weights`; returns the weight files."""
    if not source.is_dir():
        raise SystemExit(f"{source}: no such folder")
    written = []
    for folder in sorted({p.parent for p in source.rglob("*.safetensors")}):
        out = target / folder.relative_to(source)
        tensors = load_state_dict(folder)
        for other in folder.iterdir():
            if other.is_file() and other.suffix != ".safetensors":
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(other, out / other.name)
        written += save_weights(tensors, out, max_bytes)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an exported folder (train_dit --export) or one model folder")
    parser.add_argument("target", type=Path)
    parser.add_argument("--max-mb", type=float, help="largest file in MB (1e6 bytes); default: one file per folder")
    args = parser.parse_args(argv)
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
    for path in rewrite_folder(args.source, args.target, max_bytes):
        print(f"{path} {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
