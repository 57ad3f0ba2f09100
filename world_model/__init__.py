"""SANA-WM world model: the Stage-1 DiT, its recurrent session state, sampler, VAE, refiner and engine.

Names load on first use, so that the torch-free parts (``world_model.controls``, ``world_model.engine_api``)
can be imported by the server and the SDK without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "inspect_checkpoint": "checkpoint",
    "load_transformer": "checkpoint",
    "PRESETS": "config",
    "TransformerConfig": "config",
    "preset": "config",
    "build_engine": "engine",
    "StreamingEngine": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'world_model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
